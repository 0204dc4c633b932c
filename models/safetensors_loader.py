"""HF model directories: config.json, generation_config.json and single or sharded *.safetensors, without torch."""

import json
import os

import ml_dtypes
import numpy as np

from jaxpaged.models.config import ModelConfig

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; expected {what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: broken JSON ({e}); expected {what}") from None


def hf_config(folder: str, overrides: dict | None = None) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, raw config.json with `overrides` applied, generation_config.json or {}) of a HF directory."""
    path = os.path.join(folder, "config.json")
    raw = {**read_json(path, "a HF config.json"), **(overrides or {})}
    gen_path = os.path.join(folder, "generation_config.json")
    generation = read_json(gen_path, "generation_config.json") if os.path.exists(gen_path) else {}
    try:
        return ModelConfig.from_hf(raw), raw, generation
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def safetensors_files(folder: str) -> list[str]:
    """The checkpoint's files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        names = sorted(set(read_json(index, "a safetensors index")["weight_map"].values()))
    else:
        names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{folder}: no *.safetensors files; expected a HF model directory with weights")
    return [os.path.join(folder, n) for n in names]


def read_safetensors(path: str):
    """Yields (name, numpy array) from one .safetensors file (bf16 included) via its header and a memory map."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
        yield name, data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
