"""A multi-host server on 127.0.0.1: three processes of one `jax.distributed` group (1 CPU device each), the
embedded SmolLM2 (9 query / 3 KV heads) under TP=3. Process 0 serves and forwards its commands; the others follow.
Slow (three model loads and compiles on the CI machine's two cores): run with -m slow."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "smollm2_greedy.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_three_process_server_answers_as_transformers_and_stops_when_one_dies(tmp_path, smollm2_tokenizer):
    coordinator, port = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxpaged.server", "--dtype", "float32", "-tp", "3", "--max-model-len", "256",
         "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--coordinator-address",
         f"127.0.0.1:{coordinator}", "--num-processes", "3", "--process-id", str(pid), "--port", str(port),
         "--compilation-cache-dir", str(tmp_path / f"cache{pid}")],
        env=env, stdout=open(tmp_path / f"p{pid}.log", "w"), stderr=subprocess.STDOUT) for pid in range(3)]
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
        while not _healthy(url):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _logs(tmp_path)
            time.sleep(1)
        with open(FIXTURE) as f:
            case = json.load(f)["cases"][0]  # "The capital of France is", HF greedy tokens
        body = {"prompt": case["prompt"], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300).json()
        assert r["choices"][0]["text"] == smollm2_tokenizer.decode(case["hf_token_ids"][:12])
        procs[2].kill()
        killed = time.monotonic()
        assert procs[0].wait(timeout=120) != 0 and procs[1].wait(timeout=120) != 0
        assert time.monotonic() - killed < 60
        assert "another task died" in (tmp_path / "p0.log").read_text()
    finally:
        for p in procs:
            p.kill()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _logs(tmp_path) -> str:
    return "\n".join((tmp_path / f"p{i}.log").read_text()[-1500:] for i in range(3))
