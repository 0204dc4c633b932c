"""Logits parity with HF transformers (fp32) on tiny random checkpoints, loaded by our safetensors loader.

Reference logits come from tests/make_fixtures.py; when torch is installed the live test recomputes them.
"""

import json
import os

import numpy as np
import pytest

from jaxpaged.models import load_model
from tests.models.paged import PagedSequence

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TINY = ["llama2_mha_untied", "llama31_gqa_tied_rope_scaling", "llama_head_dim_mqa", "qwen2_bias_gqa"]
ATOL = 1e-4


def load(name):
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "tokens.json")) as f:
        tokens = json.load(f)
    return load_model(folder, dtype="float32"), tokens, np.load(os.path.join(folder, "hf_logits.npy"))


@pytest.mark.parametrize("name", TINY)
def test_prefill_logits_match_hf(name):
    model, tokens, hf = load(name)
    logits = PagedSequence(model, len(tokens)).feed(tokens)
    assert np.abs(logits - hf).max() < ATOL


@pytest.mark.parametrize("name", TINY)
def test_chunked_prefill_then_paged_decode_match_hf(name):
    model, tokens, hf = load(name)
    seq = PagedSequence(model, len(tokens), seed=1)
    parts = [seq.feed(tokens[:7]), seq.feed(tokens[7:17])] + [seq.feed([t]) for t in tokens[17:]]
    assert np.abs(np.concatenate(parts) - hf).max() < ATOL


@pytest.mark.parametrize("name", TINY)
def test_live_hf_parity(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, tokens, _ = load(name)
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, name), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = hf_model(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(PagedSequence(model, len(tokens)).feed(tokens) - hf).max() < ATOL
