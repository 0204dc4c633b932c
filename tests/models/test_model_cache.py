"""The model cache: a GGUF file's converted weights and tokenizer are read back bit for bit without dequantising
or converting again; damaged entries are rebuilt; an unwritable cache is skipped with one warning."""

import json
import logging
import os

import gguf.quants
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxpaged import tokenizer as tokenizer_module
from jaxpaged.models import load_model, model_cache
from jaxpaged.tokenizer import load_tokenizer
from tests.conftest import embedded_gguf_path
from tests.models.test_gguf_loader import LLAMA31, write_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXPAGED_MODEL_CACHE", str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, LLAMA31, Q.Q8_0)
    return path


def forbid_conversion(monkeypatch):
    """Makes dequantisation and GGUF parsing raise: a load that still works read everything from the cache."""
    def fail(*args, **kwargs):
        raise AssertionError("the cached load dequantised or parsed the GGUF file")

    monkeypatch.setattr(gguf.quants, "dequantize", fail)
    monkeypatch.setattr(gguf, "GGUFReader", fail)


def assert_same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_second_load_reads_cached_weights_bit_for_bit(cache, tiny_gguf, monkeypatch, dtype):
    first = load_model(tiny_gguf, dtype=dtype)
    with monkeypatch.context() as m:
        forbid_conversion(m)
        second = load_model(tiny_gguf, dtype=dtype)
    assert_same_params(first.params, second.params)
    assert (second.config, second.generation_config, second.dtype) == (first.config, first.generation_config,
                                                                         first.dtype)
    assert os.listdir(cache / model_cache.file_key(tiny_gguf)) == [f"weights-{dtype}"]


def test_embedded_model_second_load_skips_dequantisation(cache, monkeypatch):
    first = load_model()
    forbid_conversion(monkeypatch)
    assert_same_params(first.params, load_model().params)


def truncate_tensors(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def edit_manifest(folder):
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"]["model.safetensors"]["size"] += 1
    with open(path, "w") as f:
        json.dump(manifest, f)


def flip_a_byte(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


@pytest.mark.parametrize("damage", [truncate_tensors, edit_manifest, flip_a_byte])
def test_damaged_entry_is_rebuilt_not_used(cache, tiny_gguf, damage):
    first = load_model(tiny_gguf)
    folder = model_cache.part_dir(tiny_gguf, f"weights-{first.dtype.dtype.name}")
    damage(folder)
    assert model_cache.open_part(folder) is None
    assert_same_params(first.params, load_model(tiny_gguf).params)
    assert model_cache.open_part(folder) == folder  # rebuilt intact


def make_unwritable(cache, chmod: bool):
    if chmod:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        cache.mkdir()
        cache.chmod(0o500)
    else:  # a regular file where the cache's folder should be: unwritable for root too
        cache.write_text("")


@pytest.mark.parametrize("chmod", [True, False], ids=["chmod-500", "root-is-a-file"])
def test_unwritable_cache_loads_with_one_warning(cache, tiny_gguf, tmp_path, monkeypatch, caplog, chmod):
    make_unwritable(cache, chmod)
    with caplog.at_level(logging.WARNING):
        model = load_model(tiny_gguf)
        load_model(tiny_gguf)  # finds nothing cached and converts again, without a second warning
    assert [r.levelno for r in caplog.records if r.name == model_cache.__name__] == [logging.WARNING]
    monkeypatch.setenv("JAXPAGED_MODEL_CACHE", str(tmp_path / "writable"))
    assert_same_params(load_model(tiny_gguf).params, model.params)


def test_cached_tokenizer_encodes_like_the_converter(cache, monkeypatch):
    converted = load_tokenizer(embedded_gguf_path())
    monkeypatch.setattr(tokenizer_module, "_tokenizer_from_gguf", lambda path: pytest.fail("converted again"))
    cached = load_tokenizer(embedded_gguf_path())
    assert (cached.bos_token, cached.eos_token, cached.unk_token, cached.pad_token) == \
        (converted.bos_token, converted.eos_token, converted.unk_token, converted.pad_token)
    assert cached.chat_template == converted.chat_template
    for text in ["The capital of France is", "  déjà vu\n\ttabs 12345 <|im_start|>", "🦙 emoji, ünïcode"]:
        assert cached.encode(text) == converted.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    render = {"tokenize": False, "add_generation_prompt": True}
    assert cached.apply_chat_template(messages, **render) == converted.apply_chat_template(messages, **render)
    assert cached.apply_chat_template(messages, add_generation_prompt=True) == \
        converted.apply_chat_template(messages, add_generation_prompt=True)
