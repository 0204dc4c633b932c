"""Tensor parallelism on 8 virtual CPU devices (tests/conftest.py sets XLA_FLAGS): same greedy tokens for every
mesh size, weights and pool sharded as declared, KV heads replicated when the mesh has more devices than KV
heads, vLLM's errors for sizes that do not divide the heads."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxpaged import LLM, SamplingParams
from jaxpaged.models import LoadedModel, ModelConfig, load_model, save_orbax
from jaxpaged.models.loader import shipped_config
from jaxpaged.models.sharding import make_mesh, param_shardings, pool_sharding, replicated
from jaxpaged.models.weights import param_shapes
from jaxpaged.step_programs import forward_step
from tests.engine.hf_greedy import assert_greedy_matches_hf, needs_fixture

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
PROMPTS = [[1, 5, 9, 20, 33], [7, 8, 9], list(range(3, 40)), [100, 2, 54, 17]]
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
KW = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")


def greedy(model: str, tp: int, **kw) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model, tensor_parallel_size=tp, **KW, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("fixture", ["llama2_mha_untied", "llama31_gqa_tied_rope_scaling", "qwen2_bias_gqa"])
def test_real_weights_give_the_same_greedy_tokens_for_tp_1_2_4(fixture):
    folder = os.path.join(FIXTURES, fixture)  # 4 query heads; 4 or 2 KV heads (TP=4 replicates 2 of them)
    _, base = greedy(folder, 1)
    assert len({tuple(t) for t in base}) == len(PROMPTS)  # the prompts lead to different continuations
    for tp in (2, 4):
        assert greedy(folder, tp)[1] == base, tp


def test_seeded_sampling_and_logprobs_do_not_depend_on_tp():
    folder = os.path.join(FIXTURES, "llama2_mha_untied")
    params = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=12, logprobs=2, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        outs = LLM(folder, tensor_parallel_size=tp, **KW).generate([{"prompt_token_ids": p} for p in PROMPTS],
                                                                   params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, [sorted(d) for d in o.outputs[0].logprobs]) for o in outs])
    assert runs[0] == runs[1]


def test_tp_1_2_4_8_same_tokens_and_shardings(eight_heads):
    _, base = greedy(eight_heads, 1, load_format="dummy")
    for tp in (2, 4, 8):
        llm, tokens = greedy(eight_heads, tp, load_format="dummy")
        assert tokens == base, tp
        runner = llm.llm_engine.runner
        layer = runner.model.params["model"]["layers_0"]
        shard = {name: leaf.addressable_shards[0].data.shape for name, leaf in [
            ("qkv", layer["self_attn"]["qkv_proj"]["kernel"]), ("o", layer["self_attn"]["o_proj"]["kernel"]),
            ("gate_up", layer["mlp"]["gate_up_proj"]["kernel"]), ("down", layer["mlp"]["down_proj"]["kernel"]),
            ("norm", layer["input_layernorm"]["weight"]),
            ("embed", runner.model.params["model"]["embed_tokens"]["embedding"]),
            ("head", runner.model.params["lm_head"]["kernel"])]}
        kv_heads = max(2, tp)  # 2 KV heads, replicated up to one per device
        assert shard == {"qkv": (128, (128 + 2 * 16 * kv_heads) // tp), "o": (128 // tp, 128),
                         "gate_up": (128, 2 * 192 // tp), "down": (192 // tp, 128), "norm": (128,),
                         "embed": (128 // tp, 128), "head": (128, 128 // tp)}
        k_pages = runner.kv_caches[0][0]
        assert runner.model.config.num_key_value_heads == kv_heads
        assert len(k_pages.addressable_shards) == tp
        assert all(s.data.shape[2] == kv_heads // tp for s in k_pages.addressable_shards)


@needs_fixture
def test_embedded_smollm2_tp3_matches_transformers():
    llm = LLM(tensor_parallel_size=3, **{**KW, "max_model_len": 256})  # 9 query / 3 KV heads: 3 and 1 per device
    assert_greedy_matches_hf(llm)
    assert llm.llm_engine.runner.kv_caches[0][0].addressable_shards[0].data.shape[2] == 1


@pytest.mark.parametrize("load_format", ["safetensors", "dummy", "orbax"])
def test_loading_places_each_weight_into_its_sharding(load_format, tmp_path):
    folder = os.path.join(FIXTURES, "llama31_gqa_tied_rope_scaling")  # 2 KV heads: whole k/v on each of 4 devices
    plain = load_model(folder, load_format="dummy" if load_format == "dummy" else "auto", dtype="float32")
    if load_format == "orbax":
        pytest.importorskip("orbax.checkpoint")
        save_orbax(plain, str(tmp_path / "ckpt"))
        folder = str(tmp_path / "ckpt")
    placed = load_model(folder, load_format=load_format, dtype="float32", mesh=make_mesh(4))
    attn, mlp = placed.params["model"]["layers_0"]["self_attn"], placed.params["model"]["layers_0"]["mlp"]
    specs = [leaf.sharding.spec for leaf in (attn["q_proj"]["kernel"], attn["k_proj"]["kernel"],
                                             mlp["down_proj"]["kernel"], placed.params["model"]["norm"]["weight"])]
    assert specs == [PartitionSpec(None, "model"), PartitionSpec(), PartitionSpec("model", None), PartitionSpec()]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), plain.params, placed.params))


@pytest.mark.parametrize("tp, message", [
    (3, r"Total number of attention heads \(8\) must be divisible by tensor parallel size \(3\)"),
    (16, r"tensor_parallel_size=16 needs that many devices, but JAX sees 8"),
])
def test_sizes_that_do_not_fit_are_rejected(eight_heads, tp, message):
    with pytest.raises(ValueError, match=message):
        LLM(eight_heads, load_format="dummy", tensor_parallel_size=tp, **KW)


@pytest.mark.slow
def test_first_runs_at_warm_up_leave_tp_2_tokens_equal_to_tp_1(ran):
    """A GPU warm-up's run of every program once (`jaxpaged.first_runs`, forced on here) over a sharded pool:
    multi-step decodes and all, the tokens after it are tp=1's."""
    folder = os.path.join(FIXTURES, "llama2_mha_untied")
    runs = []
    for tp in (1, 2):
        ran.clear()
        llm = LLM(folder, tensor_parallel_size=tp, num_scheduler_steps=4, **KW)
        llm.llm_engine.warm_up()
        assert len(ran) == len(set(ran)) and set(ran) == set(llm.llm_engine.runner.executables)
        assert any(k[0] == "decode" for k in ran)  # the multi-step decodes too
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1] and len({tuple(t) for t in runs[0]}) == len(PROMPTS)


@pytest.mark.slow
def test_llama_70b_tp8_step_holds_an_eighth_of_weights_and_pool_per_device():
    """Compile only (nothing of 70B is allocated): the forward step's per-device arguments are 1/8 of the weights
    it reads (all but the LM head) plus 1/8 of the pool (64 query / 8 KV heads: one KV head per device)."""
    cfg = ModelConfig.from_hf(shipped_config("llama-3.1-70b"))
    mesh = make_mesh(8)
    shapes = param_shapes(cfg, jnp.bfloat16)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          param_shardings(shapes, mesh))
    model = LoadedModel(cfg, params, jnp.bfloat16, None, {}, {}, "llama-3.1-70b", mesh)
    num_pages, page_size, num_tokens, num_seqs = 4096, 16, 64, 8
    page = jax.ShapeDtypeStruct((num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim), jnp.bfloat16,
                                sharding=pool_sharding(mesh))
    rep = replicated(mesh)
    fn = jax.jit(functools.partial(forward_step, model, "reference", page_size), donate_argnums=(1, 2),
                 out_shardings=(pool_sharding(mesh), rep, rep, rep))  # pool, tables, last and all hidden states
    compiled = fn.lower(params, [(page, page)] * cfg.num_hidden_layers,
                        jax.ShapeDtypeStruct((num_seqs + 1, 64), jnp.int32, sharding=rep),
                        jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32, sharding=rep),
                        jax.ShapeDtypeStruct((num_tokens,), jnp.int32, sharding=rep),
                        jax.ShapeDtypeStruct((4 * num_seqs + 2,), jnp.int32, sharding=rep),
                        jax.ShapeDtypeStruct((3, 16), jnp.int32, sharding=rep)).compile()
    weights = sum(s.size * 2 for s in jax.tree.leaves(shapes["model"]))  # bf16; the LM head is the sampler's
    pool = 2 * cfg.num_hidden_layers * num_pages * page_size * cfg.num_key_value_heads * cfg.head_dim * 2
    per_device = compiled.memory_analysis().argument_size_in_bytes
    expected = (weights + pool) / 8
    assert weights > 138e9 and abs(per_device - expected) / expected < 0.01, (per_device, expected)
