"""`python -m jaxpaged.server` as users type it: flags, start-up log with the URL, /health, a request, Ctrl-C."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from jaxpaged.config import EngineArgs
from jaxpaged.server.cli import add_serve_args, engine_args_from
from tests.server.helpers import free_port


def test_serve_flags_map_to_engine_args():
    import argparse

    args = add_serve_args(argparse.ArgumentParser()).parse_args([
        "some/model", "--max-model-len", "512", "--no-enable-prefix-caching", "-tp", "1", "--dtype", "bfloat16",
        "--load-format", "dummy", "--served-model-name", "m", "--api-key", "k", "--gpu-memory-utilization", "0.5"])
    e = engine_args_from(args)
    assert (e.model, e.max_model_len, e.enable_prefix_caching, e.dtype, e.load_format, e.served_model_name,
            e.gpu_memory_utilization) == ("some/model", 512, False, "bfloat16", "dummy", "m", 0.5)
    assert args.api_key == "k" and args.port == 8000 and args.host == "127.0.0.1"


def test_server_multi_steps_with_prefill_by_default_unlike_offline_engine_args():
    import argparse

    parse = add_serve_args(argparse.ArgumentParser()).parse_args
    assert engine_args_from(parse([])).multi_step_with_prefill is True
    assert engine_args_from(parse(["--no-multi-step-with-prefill"])).multi_step_with_prefill is False
    assert EngineArgs().multi_step_with_prefill is False


def test_python_m_jaxpaged_server_logs_url_and_serves():
    port = free_port()
    cmd = [sys.executable, "-m", "jaxpaged.server", "--port", str(port), "--served-model-name", "tiny",
           "--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "16", "--dtype", "float32",
           "--api-key", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    log = []
    try:
        for line in proc.stderr:  # blocks until the server logs; the engine warms up in the background
            log.append(line)
            if "Uvicorn running on" in line:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code in (503, 200)
            if "Serving tiny at" in line:
                break
        assert f"Serving tiny at http://127.0.0.1:{port}/v1" in log[-1], "".join(log)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"model": "tiny", "prompt": "The capital of France is", "max_tokens": 3,
                             "temperature": 0}, timeout=60)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then re-raises the signal
        rest = proc.communicate(timeout=60)[1]
    assert "Application shutdown complete" in rest and proc.returncode in (0, -signal.SIGINT), rest


@pytest.mark.parametrize("flags, background", [([], True), (["--compile-all-before-ready"], False)])
def test_server_engine_warms_up_in_the_background_unless_told_to_compile_all(monkeypatch, flags, background):
    import argparse

    import jaxpaged.engine
    from jaxpaged.server import async_engine

    calls = []

    class Engine:
        def __init__(self, args):
            pass

        def warm_up(self, background=False):
            calls.append(background)

    monkeypatch.setattr(jaxpaged.engine, "LLMEngine", Engine)
    args = add_serve_args(argparse.ArgumentParser()).parse_args(flags)
    engine = async_engine.AsyncLLMEngine(EngineArgs(), background_compile=not args.compile_all_before_ready)
    engine._factory(engine.args)
    assert calls == [background]
