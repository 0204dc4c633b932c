"""The XLA options the step programs compile with (`step_programs.compiler_options`)."""

import jax
import jax.numpy as jnp

from jaxpaged import LLM
from jaxpaged import runner as runner_module
from jaxpaged.executable_cache import ExecutableCache
from jaxpaged.sampler import SamplerFlags
from jaxpaged.step_programs import GPU_COMPILER_OPTIONS, compiler_options


def test_gpu_programs_compile_without_xlas_triton_gemms_other_backends_as_xla_chooses():
    assert compiler_options("gpu", "") == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options("cuda", "--xla_gpu_autotune_level=0") == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options("cpu", "") is None and compiler_options("tpu", "") is None


def test_an_option_xla_flags_sets_is_left_to_it():
    for flags in ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm",
                  "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm --xla_dump_to=/tmp/x"):
        assert compiler_options("gpu", flags) is None, flags
    assert compiler_options("gpu", "--xla_gpu_enable_triton_gemm_x=1") == GPU_COMPILER_OPTIONS  # another flag


def test_every_gpu_option_is_one_this_jaxlib_knows():
    """XLA rejects an unknown option name (INVALID_ARGUMENT), whatever the backend."""
    lowered = jax.jit(lambda a: a @ a).lower(jnp.ones((4, 4)))
    assert float(lowered.compile(compiler_options=GPU_COMPILER_OPTIONS)(jnp.ones((4, 4)))[0, 0]) == 4.0


def test_the_runner_compiles_step_programs_with_the_backends_options(eight_heads, monkeypatch):
    """Here the GPU's options, given on the CPU (where XLA:CPU ignores them) to a multi-step decode program."""
    runner = LLM(eight_heads, load_format="dummy", dtype="float32", max_model_len=128, max_num_seqs=4,
                 max_num_batched_tokens=32).llm_engine.runner
    runner.executable_cache = ExecutableCache(None, "")  # compiled here, not loaded from disk
    asked, passed, real_compile = [], [], jax.stages.Lowered.compile

    def gpu_options(backend):
        asked.append(backend)
        return compiler_options("gpu", "")

    def compile_(lowered, **kwargs):
        passed.append(kwargs)
        return real_compile(lowered, **kwargs)

    monkeypatch.setattr(runner_module, "compiler_options", gpu_options)
    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)
    program = runner._compile(("decode", 4, 2, SamplerFlags(random=False, filter=False, logprobs=False)))[1]
    assert asked == ["cpu"] and passed == [{"compiler_options": {"xla_gpu_enable_triton_gemm": False}}]
    assert isinstance(program, jax.stages.Compiled)
