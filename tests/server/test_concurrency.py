"""64 concurrent streaming clients, a quarter disconnecting early: the rest finish and no pages leak."""

import asyncio
import json
import re
import time

import httpx

from tests.server.conftest import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
VLLM_NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
              "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


def scrape(url: str) -> dict[str, float]:
    """The vllm:* samples of /metrics (labels dropped)."""
    text = httpx.get(f"{url}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(vllm:[a-z_0-9]+)\{[^}]*\} ([0-9.e+-]+)$", text, re.M)}


def wait_until_idle(url: str, timeout: float = 60) -> dict[str, float]:
    """Polls /metrics until nothing runs or waits: aborts of dropped clients reach the engine asynchronously."""
    deadline = time.monotonic() + timeout
    while (m := scrape(url))["vllm:num_requests_running"] or m["vllm:num_requests_waiting"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    return m


async def stream_one(client: httpx.AsyncClient, i: int, disconnect: bool) -> tuple[int, str | None]:
    body = {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "max_tokens": 12, "temperature": 0.7,
            "seed": i, "ignore_eos": True, "stream": True}
    chunks, finish = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            chunks += 1
            finish = choice["finish_reason"] or finish
            if disconnect and chunks == 2:
                return chunks, "disconnected"  # leaving the `async with` closes the connection
    return chunks, finish


def test_64_streams_with_early_disconnects_leave_no_leaks(server):
    url = server[0]

    async def main():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(stream_one(client, i, i % 4 == 0) for i in range(64)))

    before = scrape(url)
    results = asyncio.run(main())
    assert all(r[1] == "length" and r[0] >= 1 for i, r in enumerate(results) if i % 4)
    assert all(r == (2, "disconnected") for i, r in enumerate(results) if i % 4 == 0)
    m = wait_until_idle(url)
    assert m["vllm:kv_cache_usage_perc"] == 0
    assert set(VLLM_NAMES) <= set(m), set(VLLM_NAMES) - set(m)
    generated = m["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 48 * 12 + 16 * 2 <= generated < 64 * 12  # the dropped streams stopped early
    text = httpx.get(f"{url}/metrics").text
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert re.search(rf'^vllm:{hist}_count{{engine="0",model_name="{MODEL}"}} [1-9]', text, re.M), hist


def test_non_streaming_client_that_gives_up_aborts_its_request(server):
    url = server[0]
    before = scrape(url)["vllm:generation_tokens_total"]
    body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 1000, "ignore_eos": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=httpx.Timeout(30, read=1.0)) as c:
        try:
            c.post("/v1/completions", json=body)
            raise AssertionError("1000 tokens finished within the 1 s read timeout")
        except httpx.ReadTimeout:
            pass
    m = wait_until_idle(url)
    assert m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:generation_tokens_total"] - before < 1000
