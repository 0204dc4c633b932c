"""The TPU kernel compiled by libtpu (its Mosaic compiler included) for four TPU generations, on a CPU machine.

libtpu compiles ahead of time for a described topology (`jax.experimental.topologies`) with no TPU attached;
nothing runs. This is the check that Mosaic accepts the kernel's layouts (for instance one KV head's keys sliced
out of an all-heads page buffer when the KV head count does not fill a sublane tile); speed is not measured.
libtpu comes from `scripts/setup.sh --test` (Linux), which puts it in .venv/libtpu, outside site-packages, so that
JAX never starts it in other runs; elsewhere, or with no libtpu, these tests are skipped.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import pytest

LIBTPU = os.environ.get("TPU_LIBRARY_PATH", os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so"))
if not os.path.isfile(LIBTPU):
    pytest.skip(f"no libtpu at {LIBTPU} (bash scripts/setup.sh --test installs it on Linux)", allow_module_level=True)
# Read by libtpu when it starts: without TPU_SKIP_MDS_QUERY .. TPU_WORKER_ID it asks a TPU VM's metadata server who
# it is; ALLOW_MULTIPLE_LIBTPU_LOAD lets it start while another process holds libtpu (its lockfile in /tmp).
for key, value in dict(TPU_LIBRARY_PATH=LIBTPU, TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v5litepod-4",
                       TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0", ALLOW_MULTIPLE_LIBTPU_LOAD="1").items():
    os.environ.setdefault(key, value)

from jax.experimental import topologies  # noqa: E402

from jaxpaged.kernels.tpu import TpuConfig, ragged_paged_attention_tpu  # noqa: E402
from tests.kernels.test_tpu_kernel import abstract_args  # noqa: E402

TOPOLOGIES = ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"]


@functools.cache
def tpu_device(topology: str):
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("heads,head_dim,page_size,dtype", [
    ((32, 8), 128, 16, jnp.bfloat16), ((9, 3), 64, 16, jnp.bfloat16), ((8, 1), 64, 8, jnp.bfloat16),
    ((8, 2), 128, 32, jnp.float32)])
def test_compiles_for_tpu(topology, heads, head_dim, page_size, dtype):
    args = abstract_args(heads, head_dim, page_size, dtype, jax.sharding.SingleDeviceSharding(tpu_device(topology)))
    fn = functools.partial(ragged_paged_attention_tpu, sm_scale=head_dim ** -0.5, config=TpuConfig())
    compiled = jax.jit(fn).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.input_shardings[0][0].device_set == {tpu_device(topology)}


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("heads,page_size,seqs,pages,tokens", [
    ((32, 8), 16, 256, 8192, 2048),   # 128k tokens of context: an 8 MiB page table, past SMEM's 1 MiB
    ((32, 8), 128, 256, 1024, 8192),  # large pages: 8 of them per K/V block would overflow v5e's 16 MiB of VMEM
    ((64, 8), 16, 512, 2048, 8192)])  # Llama-3.1-70B heads, 512 sequences
def test_serving_sized_batches_compile(topology, heads, page_size, seqs, pages, tokens):
    on = jax.sharding.SingleDeviceSharding(tpu_device(topology))
    args = abstract_args(heads, 128, page_size, jnp.bfloat16, on, seqs=seqs, pages=pages, tokens=tokens, pool=2048)
    fn = functools.partial(ragged_paged_attention_tpu, sm_scale=128 ** -0.5)
    assert "tpu_custom_call" in jax.jit(fn).lower(*args).compile().as_text()


def compile_engine_step(model, *, max_model_len: int, buckets, num_pages: int, topology: str = "v5e:2x2"):
    """The engine's forward program (attention_impl="tpu", donated page pool, device page tables) compiled for
    one chip of `topology` in the largest bucket; returns the compiled HLO text."""
    from jaxpaged.runner import ModelRunner

    runner = ModelRunner(model, page_size=16, max_model_len=max_model_len, buckets=buckets, attn_impl="tpu",
                         kv_dtype=jnp.bfloat16)
    on = jax.sharding.SingleDeviceSharding(tpu_device(topology))
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
    page = spec(runner._pool_shape(num_pages), jnp.bfloat16)
    num_tokens, num_seqs = max(buckets.all_shapes())
    params = jax.tree.map(lambda x: spec(x.shape, x.dtype), model.params)
    tables, slot_tokens = spec(runner.page_tables.shape), spec(runner.slot_tokens.shape)
    layers = model.config.num_hidden_layers
    return runner.forward_fn.lower(params, [(page, page)] * layers, tables, slot_tokens, spec((num_tokens,)),
                                   spec((4 * num_seqs + 2,)), spec((3, 512))).compile().as_text()


def test_engine_step_compiles_for_tpu():
    """Llama-3.2-1B shape cut to 2 layers, a small engine's largest bucket."""
    from jaxpaged.buckets import Buckets
    from jaxpaged.models.loader import load_model

    model = load_model("llama-3.2-1b", load_format="dummy", dtype="bfloat16",
                       hf_config_overrides={"num_hidden_layers": 2, "vocab_size": 2048})
    hlo = compile_engine_step(model, max_model_len=512, buckets=Buckets(256, 32), num_pages=1024)
    assert hlo.count("tpu_custom_call") == 2  # one attention kernel per layer


@pytest.mark.slow
def test_embedded_model_engine_step_compiles_for_tpu():
    """The embedded SmolLM2-135M (30 layers, bf16) as `LLM()` would serve it on a v5e: 8k context, 2,048 tokens x
    256 sequences per step, a 20,000-page pool."""
    from jaxpaged.buckets import Buckets
    from jaxpaged.models.loader import load_model

    model = load_model(None, dtype="bfloat16")
    hlo = compile_engine_step(model, max_model_len=8192, buckets=Buckets(2048, 256), num_pages=20000)
    assert hlo.count("tpu_custom_call") == 30
