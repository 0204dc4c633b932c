"""Safetensors (bf16, sharded), orbax and dummy loaders, shipped configs and clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxpaged.models import SHIPPED_CONFIGS, ModelConfig, load_model, save_orbax
from jaxpaged.models.dummy import dummy_params
from jaxpaged.models.loader import shipped_config
from jaxpaged.models.safetensors_loader import read_safetensors
from tests.models.paged import PagedSequence

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TINY = os.path.join(FIXTURES, "llama31_gqa_tied_rope_scaling")
UNTIED = os.path.join(FIXTURES, "llama2_mha_untied")


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (the numpy API of `safetensors` cannot write bfloat16)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + b"".join(a.tobytes() for a in tensors.values()))


def copy_config(src: str, dst, **changes) -> None:
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_reader_matches_safetensors_library():
    path = os.path.join(UNTIED, "model.safetensors")
    ref = safetensors.numpy.load_file(path)
    ours = dict(read_safetensors(path))
    assert sorted(ours) == sorted(ref)
    for name, array in ref.items():
        np.testing.assert_array_equal(ours[name], array)


def test_sharded_bf16_checkpoint_loads_in_checkpoint_dtype(tmp_path):
    tensors = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in
               read_safetensors(os.path.join(UNTIED, "model.safetensors"))}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    copy_config(UNTIED, tmp_path, dtype="bfloat16")
    for shard, keys in shards.items():
        write_safetensors(str(tmp_path / shard), {k: tensors[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index, so never opened")

    model = load_model(str(tmp_path))
    ref = load_model(UNTIED, dtype="float32")
    assert model.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(ref.params)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32))
    as_f32 = load_model(str(tmp_path), dtype="float32")
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(as_f32.params))

    with open(os.path.join(UNTIED, "tokens.json")) as f:
        tokens = json.load(f)
    hf = np.load(os.path.join(UNTIED, "hf_logits.npy"))
    logits = PagedSequence(model, len(tokens)).feed(tokens)  # bf16 compute, f32 logits
    assert np.isfinite(logits).all() and np.abs(logits - hf).max() < 0.05 * np.abs(hf).max()


def test_orbax_round_trip_keeps_weights_config_and_tokenizer_info(tmp_path):
    pytest.importorskip("orbax.checkpoint")  # optional dependency (the `orbax` extra)
    model = load_model(TINY, dtype="float32")
    save_orbax(model, str(tmp_path / "ckpt"))
    back = load_model(str(tmp_path / "ckpt"))
    assert back.config == model.config and back.dtype == jnp.float32
    assert model.tokenizer_path is None  # the fixture has no tokenizer files
    assert (back.tokenizer_path, back.tokenizer_kwargs, back.name) == (None, {}, model.name)
    assert jax.tree.structure(back.params) == jax.tree.structure(model.params)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    half = load_model(str(tmp_path / "ckpt"), load_format="orbax", dtype="bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(half.params))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_dummy_configs_have_expected_shapes_without_materialising(name):
    cfg = ModelConfig.from_hf(shipped_config(name))
    shapes = jax.eval_shape(lambda: dummy_params(cfg, jnp.bfloat16, 0))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    expected = {"llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9}[name]
    assert abs(total - expected) / expected < 0.01
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))
    assert cfg.rope_type == "llama3" and cfg.num_key_value_heads == 8


def test_dummy_shipped_config_with_overrides_loads_small():
    model = load_model("llama-3.2-1b", load_format="dummy", hf_config_overrides={
        "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512, "head_dim": 16})
    assert model.dtype == jnp.bfloat16 and model.tokenizer_path is None
    assert model.generation_config["eos_token_id"] == [128001, 128008, 128009]
    assert model.params["model"]["embed_tokens"]["embedding"].shape == (512, 64)


def test_dummy_weights_are_deterministic_per_seed():
    a, b, c = (load_model(TINY, load_format="dummy", dtype="float32", seed=s) for s in (1, 1, 2))
    la, lb, lc = (jax.tree.leaves(m.params) for m in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not any(np.array_equal(x, y) for x, y in zip(la, lc) if x.ndim == 2)


def test_missing_and_broken_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="broken.gguf: not a readable GGUF"):
        load_model(str(broken))
    folder = tmp_path / "ckpt"
    copy_config(TINY, folder)
    with pytest.raises(FileNotFoundError, match="ckpt: no \\*.safetensors"):
        load_model(str(folder))
    (folder / "model.safetensors").write_bytes(open(os.path.join(TINY, "model.safetensors"), "rb").read()[:5000])
    with pytest.raises(ValueError, match="model.safetensors: .*(truncated|not a readable)"):
        load_model(str(folder))
    with pytest.raises(FileNotFoundError, match="jaxpaged.json: not found; expected an orbax checkpoint"):
        load_model(str(folder), load_format="orbax")


def test_checkpoint_that_does_not_fit_its_config_is_rejected(tmp_path):
    copy_config(TINY, tmp_path, intermediate_size=64)
    shutil.copy(os.path.join(TINY, "model.safetensors"), tmp_path)
    with pytest.raises(ValueError, match="down_proj.weight' has shape \\(64, 96\\), expected \\(64, 64\\)"):
        load_model(str(tmp_path))
    copy_config(TINY, tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="missing weights model.layers_2"):
        load_model(str(tmp_path))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="load_format='pt' is not supported"):
        load_model(TINY, load_format="pt")
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        load_model(TINY, dtype="int8")
