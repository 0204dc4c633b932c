"""Two processes of a `jax.distributed` group on 127.0.0.1, 4 virtual CPU devices each, one TP=8 mesh over all
of them: the same greedy tokens as one process with 8 devices; a process that dies stops the other with an error."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from tests.engine.test_tensor_parallel import KW, PARAMS, PROMPTS, greedy

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices for the baseline")

WORKER = """
import json, os, sys
from jaxpaged import LLM, SamplingParams
config, port, pid, die_after, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = LLM(config, load_format="dummy", tensor_parallel_size=8, coordinator_address=f"127.0.0.1:{port}",
          num_processes=2, process_id=pid, compilation_cache_dir=cache, **json.loads(sys.argv[6]))
prompts, params = json.loads(sys.argv[7]), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
engine = llm.llm_engine
if die_after:  # step by hand and vanish mid-run
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    for _ in range(die_after):
        engine.step()
    os._exit(3)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, tmp_path, die_after=(0, 0)) -> list[subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1"}
    port = free_port()
    return [subprocess.Popen([sys.executable, "-c", WORKER, config, str(port), str(pid), str(die_after[pid]),
                              str(tmp_path / f"cache{pid}"), json.dumps(KW), json.dumps(PROMPTS)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pid in (0, 1)]


def test_two_processes_with_one_mesh_give_the_one_process_tokens(eight_heads, tmp_path):
    _, expected = greedy(eight_heads, 8, load_format="dummy")
    procs = launch(eight_heads, tmp_path)
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        lines = [line for line in out.splitlines() if line.startswith("TOKENS ")]
        assert json.loads(lines[-1].removeprefix("TOKENS ")) == expected


def test_a_process_that_dies_stops_the_other_with_an_error(eight_heads, tmp_path):
    procs = launch(eight_heads, tmp_path, die_after=(0, 6))
    survivor, dying = procs
    assert dying.wait(timeout=300) == 3
    died = time.monotonic()
    out, _ = survivor.communicate(timeout=120)
    assert survivor.returncode != 0
    assert time.monotonic() - died < 60
    assert "another process probably died" in out or "another task died" in out, out[-3000:]
