"""Error statuses and bodies; the server stays healthy after each."""

import httpx
import pytest

from tests.server.conftest import MODEL


def assert_error(r, status, param=None, contains=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert contains in err["message"]
    if param is not None:
        assert err["param"] == param


def test_unauthorized_without_or_with_wrong_key(server):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "model", "gpt-9")


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 99}, "logprobs"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_invalid_completion_fields_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json={"model": MODEL, **body}), 400, param)


def test_invalid_chat_fields_are_400(http):
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]}), 400)
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user",
                 "content": "x"}], "top_logprobs": 2}), 400, "top_logprobs")


def test_malformed_json_is_400(http):
    r = http.post("/v1/completions", content=b'{"model": "smollm2", "prompt": ', headers={"Content-Type":
                                                                                         "application/json"})
    assert_error(r, 400)


def test_prompt_too_long_is_400_with_context_length_message(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 1100, "max_tokens": 4})
    assert_error(r, 400, "max_tokens", "maximum context length is 1024 tokens")
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5000})
    assert_error(r, 400, "max_tokens", "maximum context length")


def test_server_still_healthy_and_serving_after_errors(http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                                           "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]


def test_tokenize_detokenize_version(http):
    r = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()
    assert r["tokens"] == [504, 3575, 282, 4649, 314] and r["count"] == 5 and r["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "The capital of France is"}
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    assert "version" in http.get("/version").json()
