"""64 concurrent streaming clients, a quarter of them disconnecting early: the rest finish, no pages leak."""

import asyncio
import json
import re
import time

import httpx

from tests.server.conftest import API_KEY, MODEL


async def stream_one(client: httpx.AsyncClient, i: int, disconnect: bool) -> tuple[int, str | None]:
    body = {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "max_tokens": 16, "temperature": 0.7,
            "seed": i, "stream": True}
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
                return chunks, "disconnected"
    return chunks, finish


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(vllm:[a-z_]+)\{[^}]*\} ([0-9.e+-]+)$", text, re.M)}


def test_64_streams_with_early_disconnects_leave_no_leaks(server):
    url = server[0]

    async def main():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=300) as client:
            return await asyncio.gather(*(stream_one(client, i, i % 4 == 0) for i in range(64)))

    results = asyncio.run(main())
    done = [r for i, r in enumerate(results) if i % 4]
    assert all(finish == "length" and chunks >= 1 for chunks, finish in done)
    assert all(finish == "disconnected" for i, (_, finish) in enumerate(results) if i % 4 == 0)
    deadline = time.monotonic() + 60  # aborts of dropped streams reach the engine asynchronously
    while (m := scrape(url))["vllm:num_requests_running"] or m["vllm:num_requests_waiting"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:generation_tokens_total"] > 0 and m["vllm:prompt_tokens_total"] > 0
    text = httpx.get(f"{url}/metrics").text
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert f"vllm:{hist}_bucket" in text
