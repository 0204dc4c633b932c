"""On-disk cache of converted models: a GGUF file's dequantised params, HF-style config and (written by
`jaxpaged.tokenizer`) its fast tokenizer, so that later loads skip dequantisation and the GGUF tokenizer converter.

Layout: `<root>/<key>/<part>/`, where root is `$JAXPAGED_MODEL_CACHE`, else `$XDG_CACHE_HOME/jaxpaged/models`, else
`~/.cache/jaxpaged/models`; key is `file_key(source)`; a part is `weights-<dtype>` (model.safetensors with the final
params leaves in that dtype, config.json, generation_config.json) or `tokenizer` (`save_pretrained`'s files). Each
part is written into a temporary folder next to it and renamed into place, with a manifest.json listing every file's
size and CRC32 plus a CRC32 of the manifest itself. A part whose manifest, sizes or checksums disagree (half-written,
truncated, corrupt, edited) is never used: it is rebuilt from the source. Delete the root folder to clear the cache.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.safetensors_loader import read_safetensors
from jaxpaged.models.sharding import placer
from jaxpaged.models.weights import param_shapes

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # NOTE: bump when the conversion (dequantisation, Q/K un-permutation, params layout) changes
_MANIFEST = "manifest.json"
_HEAD_BYTES = 8 << 20
_SAMPLES = 16
_SAMPLE_BYTES = 64 << 10
_CHUNK = 16 << 20
_TENSORS, _CONFIG, _GENERATION = "model.safetensors", "config.json", "generation_config.json"


def cache_root() -> str:
    """The cache's root folder (see the module docstring)."""
    if root := os.environ.get("JAXPAGED_MODEL_CACHE"):
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxpaged", "models")


def file_key(path: str) -> str:
    """A content key of `path`: sha256 of CACHE_VERSION, the size, the first 8 MiB and 17 evenly spaced 64 KiB
    blocks (the last one ending at the end of the file).

    The first 8 MiB hold a GGUF file's header and metadata (1.7 MB for SmolLM2's 49k-token vocabulary). About 10 MB
    are read whatever the file's size (~15 ms), where hashing the whole file costs ~0.15 s for the embedded 98 MB
    model on this machine and seconds for multi-GB models on every load. The price: an edit of a few quantised
    blocks that keeps the size and misses every sample goes unnoticed; a new release or re-quantisation does not.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"jaxpaged-model-cache-v{CACHE_VERSION}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_HEAD_BYTES))
        for i in range(_SAMPLES + 1):
            f.seek(max(size - _SAMPLE_BYTES, 0) * i // _SAMPLES)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def part_dir(source: str, part: str) -> str:
    """Where `part` of the file `source` is cached (whether or not it exists)."""
    return os.path.join(cache_root(), file_key(source), part)


def open_part(folder: str) -> str | None:
    """`folder` (a `part_dir`) if it holds a complete, intact cached part, else None (a damaged one is logged)."""
    if not os.path.isdir(folder):
        return None
    if not _intact(folder):
        logger.info("Model cache entry %s is damaged; rebuilding it.", folder)
        return None
    return folder


def write_part(folder: str, fill: Callable[[str], object]) -> str | None:
    """Caches a part in `folder` (a `part_dir`): `fill(tmp)` writes its files into a temporary folder, which gets
    a manifest and is renamed into place (replacing a damaged entry). Returns `folder`, or None after a warning
    when the cache cannot be written (the caller goes on without it)."""
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
        try:
            fill(tmp)
            _write_manifest(tmp)
            _install(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        _warn_unwritable(cache_root(), str(e))
        return None
    return folder


@functools.cache
def _warn_unwritable(root: str, reason: str) -> None:
    """NOTE: cached so that one load (weights, then tokenizer) warns once per root and reason, not per part."""
    logger.warning("Model cache %s is not writable (%s); loading without it. Set JAXPAGED_MODEL_CACHE to a "
                   "writable folder to cache converted models.", root, reason)


def _install(tmp: str, folder: str) -> None:
    """Renames `tmp` to `folder`; an existing (damaged, or concurrently written) `folder` is moved aside first."""
    if not os.path.exists(folder):
        os.rename(tmp, folder)
        return
    trash = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(folder))
    os.rename(folder, os.path.join(trash, "old"))
    os.rename(tmp, folder)
    shutil.rmtree(trash, ignore_errors=True)


def _file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _json_crc32(value) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True).encode())


def _write_manifest(folder: str) -> None:
    files = {name: {"size": os.path.getsize(os.path.join(folder, name)),
                    "crc32": _file_crc32(os.path.join(folder, name))} for name in sorted(os.listdir(folder))}
    body = {"version": CACHE_VERSION, "files": files}
    with open(os.path.join(folder, _MANIFEST), "w") as f:
        json.dump({**body, "manifest_crc32": _json_crc32(body)}, f, indent=1)


def _intact(folder: str) -> bool:
    """Whether the manifest is unedited, lists exactly the folder's files and each has its size and CRC32."""
    try:
        with open(os.path.join(folder, _MANIFEST)) as f:
            manifest = json.load(f)
        body = {"version": manifest["version"], "files": manifest["files"]}
        if manifest["manifest_crc32"] != _json_crc32(body) or body["version"] != CACHE_VERSION:
            return False
        files = body["files"]
        if set(files) != set(os.listdir(folder)) - {_MANIFEST}:
            return False
        paths = {name: os.path.join(folder, name) for name in files}
        return all(os.path.getsize(paths[n]) == info["size"] for n, info in files.items()) and \
            all(_file_crc32(paths[n]) == info["crc32"] for n, info in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached_params(source: str, dtype, build: Callable[[], tuple[dict, dict, dict]],
                  mesh=None) -> tuple[dict, dict, dict]:
    """(HF config dict, generation config, params in `dtype`) of the file `source`: read from the cache (each
    tensor placed on `mesh` as it is read, when given), else `build()` (the real conversion) and cached for the
    next load (by a single process; a multi-host run reads an entry but does not write one)."""
    folder = part_dir(source, f"weights-{jnp.dtype(dtype).name}")
    cached = None if open_part(folder) is None else _read_params(folder, dtype, mesh)
    if cached is not None:
        logger.info("Read the converted weights of %s from the model cache %s.", source, folder)
        return cached
    raw, generation, params = build()
    if jax.process_count() == 1:  # across hosts no process holds whole tensors: one process fills the cache
        write_part(folder, functools.partial(_write_params, raw=raw, generation=generation, params=params))
    return raw, generation, params


def _write_params(folder: str, *, raw: dict, generation: dict, params: dict) -> None:
    """Writes the params leaves (named by their pytree path, "model/layers_0/mlp/up_proj/kernel") and configs."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {"/".join(k.key for k in path): np.asarray(leaf) for path, leaf in leaves}
    safetensors.numpy.save_file(arrays, os.path.join(folder, _TENSORS))
    for name, value in ((_CONFIG, raw), (_GENERATION, generation)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(value, f, indent=1)


def _read_params(folder: str, dtype, mesh) -> tuple[dict, dict, dict] | None:
    """The cached (config, generation, params); None (logged) when they do not fit the config's param shapes."""
    with open(os.path.join(folder, _CONFIG)) as f:
        raw = json.load(f)
    with open(os.path.join(folder, _GENERATION)) as f:
        generation = json.load(f)
    cfg = ModelConfig.from_hf(raw)
    place = placer(cfg, dtype, mesh)
    params: dict = {"model": {}, "lm_head": {}}
    for name, array in read_safetensors(os.path.join(folder, _TENSORS)):
        *parents, leaf = name.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = place((*parents, leaf), np.array(array))  # a copy: the file may be replaced later
    expected = param_shapes(cfg, dtype)
    if jax.tree.map(lambda a: (a.shape, a.dtype), params) != jax.tree.map(lambda a: (a.shape, a.dtype), expected):
        logger.info("Model cache entry %s does not match its config's parameter shapes; rebuilding it.", folder)
        return None
    return raw, generation, params
