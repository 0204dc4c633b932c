"""CompileMemory and autotune_bytes: compiles start only while their autotuning buffers fit the device memory the
KV pool leaves free (the 8B server's start on an 80 GB card failed without it)."""

import contextlib
import threading

import jax
import pytest

from jaxpaged import LLM
from jaxpaged.compile_memory import REDZONE, CompileMemory, autotune_bytes, gemm_bytes
from jaxpaged.executable_cache import ExecutableCache
from jaxpaged.models import ModelConfig
from jaxpaged.models.loader import shipped_config
from jaxpaged.sampler import SamplerFlags
from jaxpaged.step_programs import BANNED_MIN, PROMPT_CHUNK

MiB = 1 << 20


def test_the_8b_lm_head_buffer_is_the_one_xla_failed_to_allocate():
    # H100, 2026-12-06: "ran out of memory trying to allocate 1018.00MiB" (the LM head between red zones)
    assert 4096 * 128256 * 2 + 2 * REDZONE == 1018 * MiB
    cfg = ModelConfig.from_hf(shipped_config("llama-3.1-8b"))
    sampler = autotune_bytes(cfg, ("sample", 256, SamplerFlags(), 1, BANNED_MIN), 2, PROMPT_CHUNK)
    assert sampler == (256 * 4096 + 4096 * 128256) * 2 + 2 * 256 * 128256 * 4 + 8 * REDZONE
    decode = autotune_bytes(cfg, ("decode", 256, 8, SamplerFlags()), 2, PROMPT_CHUNK)
    assert decode == sampler  # the LM head is larger than any layer GEMM at 256 rows
    # the largest layer GEMM of a 8,192-token forward: the fused gate/up projection, bf16 out
    assert autotune_bytes(cfg, ("forward", 8192, 256), 2, PROMPT_CHUNK) == gemm_bytes(8192, 4096, 28672, 2, 2)
    assert autotune_bytes(cfg, ("prompt", 8192), 2, PROMPT_CHUNK) == sampler  # logits in chunks of 256 rows
    assert autotune_bytes(cfg, ("update",), 2, PROMPT_CHUNK) == 0


def _wait_until(predicate):
    done = threading.Event()
    for _ in range(10_000):
        if predicate():
            return
        done.wait(0.001)
    raise AssertionError("condition not reached")


def test_a_compile_waits_while_the_memory_is_held_and_one_too_large_runs_alone():
    memory, order = CompileMemory(), []
    memory.limit(10)
    first, second = threading.Event(), threading.Event()

    def compile_(name, nbytes, release):
        with memory.hold(nbytes):
            order.append(f"{name} in")
            release.wait()
        order.append(f"{name} out")

    a = threading.Thread(target=compile_, args=("a", 6, first))
    a.start()
    _wait_until(lambda: order == ["a in"])
    b = threading.Thread(target=compile_, args=("b", 40, second))  # more than the capacity: waits for a to leave
    b.start()
    _wait_until(lambda: memory.waiting == 1)
    with memory.hold(4):  # 6 + 4 fit beside a while b waits
        order.append("c in")
    first.set()
    a.join()
    _wait_until(lambda: order[-1] == "b in")
    second.set()
    b.join()
    assert order == ["a in", "c in", "a out", "b in", "b out"]


def test_without_a_limit_nothing_waits():
    memory = CompileMemory()
    with memory.hold(1 << 40), memory.hold(1 << 40):
        assert memory.waiting == 0


def test_warm_up_under_a_one_byte_limit_compiles_the_programs_one_at_a_time(eight_heads, monkeypatch):
    runner = LLM(eight_heads, load_format="dummy", dtype="float32", max_model_len=128, max_num_seqs=4,
                 max_num_batched_tokens=32).llm_engine.runner
    runner.executables.clear()
    runner.executable_cache = ExecutableCache(None, "")  # compile every program here, none loaded from disk
    memory, hold = runner.compile_memory, runner.compile_memory.hold
    estimates, inside, most, lock = [], [0], [0], threading.Lock()

    @contextlib.contextmanager
    def counting(nbytes):
        estimates.append(nbytes)
        with hold(nbytes):
            with lock:
                inside[0] += nbytes > 0
                most[0] = max(most[0], inside[0])
            yield
            with lock:
                inside[0] -= nbytes > 0

    monkeypatch.setattr(memory, "hold", counting)
    memory.limit(1)
    runner.warm_up(num_decode_steps=2)
    assert len(estimates) == len(runner.executables) > 10  # every program compiled through `hold`
    assert most[0] == 1  # each needed more than the 1-byte limit: one at a time, in 8 threads


def _oom():
    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 240.00MiB")


def test_a_compile_out_of_memory_beside_others_runs_again_alone():
    memory, held_then = CompileMemory(), []
    memory.limit(10)
    entered, leave = threading.Event(), threading.Event()

    def other():
        with memory.hold(5):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait()

    def compile_():
        held_then.append(memory._held)
        if len(held_then) == 1:
            leave.set()  # the other compile finishes while this one fails
            raise _oom()
        return "program"

    assert memory.compile(compile_, 2, "step program x") == "program"
    thread.join()
    assert held_then == [7, 10]  # first beside the other (5 + 2), then alone (the whole capacity)


def test_out_of_memory_alone_says_what_to_lower_and_other_errors_pass_through():
    memory = CompileMemory()
    memory.limit(3 << 30)

    def failing():
        raise _oom()

    with pytest.raises(RuntimeError, match=r"compiling step program y alone, with 3.00 GiB .* lower "
                                           r"gpu_memory_utilization"):
        memory.compile(failing, 1, "step program y")

    def broken():
        raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
        memory.compile(broken, 1, "step program z")
