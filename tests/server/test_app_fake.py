"""Server behaviour that needs no model, against FakeEngine: start-up, SSE framing, failures, disconnects."""

import asyncio
import threading

import httpx
import pytest

from jaxpaged.config import EngineArgs
from jaxpaged.server.app import build_app
from jaxpaged.server.async_engine import AsyncLLMEngine
from tests.server.fake_engine import FakeEngine
from tests.server.helpers import serve_in_thread, sse_events


def chat_body(content="hi", **kw):
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": 5, **kw}


@pytest.fixture(scope="module")
def fake():
    """(base_url, FakeEngine) of one server over a ready FakeEngine."""
    engine = FakeEngine()
    async_engine = AsyncLLMEngine(EngineArgs(), engine_factory=lambda args: engine)
    with serve_in_thread(build_app(async_engine)) as url:
        assert async_engine.ready.wait(30)
        yield url, engine
    async_engine.shutdown()


def test_health_is_503_until_warm_up_is_done():
    gate = threading.Event()

    def slow_factory(args):
        gate.wait(30)
        return FakeEngine()

    async_engine = AsyncLLMEngine(EngineArgs(), engine_factory=slow_factory)
    with serve_in_thread(build_app(async_engine)) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        assert httpx.post(f"{url}/v1/chat/completions", json=chat_body()).status_code == 503
        assert httpx.get(f"{url}/metrics").status_code == 200
        gate.set()
        assert async_engine.ready.wait(30)
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"][
            "content"] == "abcde"
    async_engine.shutdown()


def test_engine_start_failure_is_reported_by_health():
    def broken(args):
        raise RuntimeError("no memory for the KV cache")

    async_engine = AsyncLLMEngine(EngineArgs(), engine_factory=broken)
    with serve_in_thread(build_app(async_engine)) as url:
        assert async_engine.ready.wait(30)
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and "no memory for the KV cache" in r.json()["error"]["message"]


def test_chat_stream_framing_role_first_then_usage_then_done(fake):
    body = chat_body(n=2, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{fake[0]}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    assert all(len(c["choices"]) == 1 and c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for index, expected in ((0, "abcde"), (1, "bcdef")):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and all("role" not in c["delta"] for c in mine[1:])
        assert "".join(c["delta"]["content"] for c in mine) == expected
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]


def test_completion_stream_without_usage_has_no_usage_chunk(fake):
    body = {"model": "fake", "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{fake[0]}/v1/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and all(e["choices"] and "usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "abc"


def test_completion_prompt_list_n2_indices_echo_and_usage(fake):
    body = {"model": "fake", "prompt": ["p0", "P1"], "n": 2, "max_tokens": 2, "echo": True}
    r = httpx.post(f"{fake[0]}/v1/completions", json=body).json()
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, "p0ab"), (1, "p0bc"), (2, "P1ab"), (3, "P1bc")]
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12,
                          "prompt_tokens_details": {"cached_tokens": 4}}
    body["prompt"] = [[80, 49]]  # token ids are echoed as their text
    r = httpx.post(f"{fake[0]}/v1/completions", json=body).json()
    assert [c["text"] for c in r["choices"]] == ["P1ab", "P1bc"]


def test_completion_logprobs_shape(fake):
    r = httpx.post(f"{fake[0]}/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["token_logprobs"] == [-0.5] * 3 and lp["text_offset"] == [0, 1, 2]
    assert lp["top_logprobs"][0] == {"a": -0.5, "b": -2.0}


def test_engine_rejection_fails_only_that_request(fake):
    async def main():
        async with httpx.AsyncClient(base_url=fake[0], timeout=30) as c:
            return await asyncio.gather(
                c.post("/v1/chat/completions", json=chat_body("please reject")),
                c.post("/v1/chat/completions", json=chat_body("please reject", stream=True)),
                *(c.post("/v1/chat/completions", json=chat_body(f"fine {i}")) for i in range(4)))

    bad, bad_stream, *good = asyncio.run(main())
    for r in (bad, bad_stream):
        assert r.status_code == 400 and "fake engine rejects" in r.json()["error"]["message"]
    assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abcde" for r in good)


def test_step_failure_is_500_or_error_chunk_and_server_keeps_serving(fake):
    r = httpx.post(f"{fake[0]}/v1/chat/completions", json=chat_body("boom0"))
    err = r.json()["error"]
    assert r.status_code == 500 and err["type"] == "InternalServerError" and "fake device failure" in err["message"]
    with httpx.stream("POST", f"{fake[0]}/v1/chat/completions", json=chat_body("boom2", stream=True)) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-2]) == "ab"
    assert events[-2]["error"]["code"] == 500 and events[-1] == "[DONE]"
    r = httpx.post(f"{fake[0]}/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abcde"
    assert fake[1].idle_steps == 0  # the loop blocks on its inbox when there is no work


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_engine_request(fake, stream):
    engine = fake[1]
    engine.abort_event.clear()
    before = len(engine.aborted)
    body = {"model": "fake", "prompt": "x" if stream else "hold", "max_tokens": 60, "stream": stream}
    with httpx.Client(base_url=fake[0], timeout=httpx.Timeout(30, read=30 if stream else 0.3)) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())  # one chunk, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body)
    assert engine.abort_event.wait(30)
    assert len(engine.aborted) == before + 1 and engine.aborted[-1].startswith("cmpl-")
