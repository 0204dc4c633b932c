"""Error statuses and bodies against the real engine; bad requests never reach it and the server stays healthy."""

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL
from tests.server.test_concurrency import scrape

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def assert_error(r, status, param=None, contains=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert contains in err["message"], err
    if param is not None:
        assert err["param"] == param, err


def test_unauthorized_without_or_with_wrong_key_but_health_and_metrics_open(server):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    assert httpx.get(f"{url}/v1/models").json() == {"error": "Unauthorized"}
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{url}{path}").status_code == 200


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "model", "gpt-9")
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model")


def test_unknown_route_and_wrong_method_have_error_bodies(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


COMPLETION_CASES = [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "min_p": 2}, "min_p"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "stop": [""]}, None),
    ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, None),
    ({"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize("body,param", COMPLETION_CASES)
def test_invalid_completion_fields_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json={"model": MODEL, **body}), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({**CHAT, "add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({**CHAT, "chat_template": "{{ raise_exception('no') }}"}, "messages"),
])
def test_invalid_chat_fields_are_400(http, body, param):
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, **body}), 400, param)


@pytest.mark.parametrize("content", [b'{"model": "smollm2", "prompt": ', b"[1, 2]", b"not json", b""])
def test_malformed_json_is_400(http, content):
    assert_error(http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"}), 400)


def test_prompt_too_long_is_400_with_context_length_message(http):
    msg = f"maximum context length is {MAX_MODEL_LEN} tokens"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 1100, "max_tokens": 4})
    assert_error(r, 400, "max_tokens", msg)
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5000}), 400,
                 "max_tokens", msg)
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 1100}]}
    assert_error(http.post("/v1/chat/completions", json=long_chat), 400, "max_tokens", msg)
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": MAX_MODEL_LEN}), 400,
                 "max_tokens", msg)


def test_bad_requests_never_reach_the_engine(server, http):
    before = scrape(server[0])["vllm:prompt_tokens_total"]
    for body, _ in COMPLETION_CASES:
        assert http.post("/v1/completions", json={"model": MODEL, **body}).status_code == 400
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi " * 1100}).status_code == 400
    assert scrape(server[0])["vllm:prompt_tokens_total"] == before


def test_server_still_healthy_and_serving_after_errors(http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                                           "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]


def test_tokenize_detokenize_version_models(http):
    r = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()
    assert r == {"count": 5, "max_model_len": MAX_MODEL_LEN, "tokens": [504, 3575, 282, 4649, 314]}
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "The capital of France is"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 3
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={}), 400)
    assert http.get("/version").json()["version"]
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == MAX_MODEL_LEN
