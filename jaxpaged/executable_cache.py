"""On-disk cache of compiled step programs, so that a later start skips tracing, lowering and compiling.

JAX's persistent compilation cache (also on) saves only the XLA compile: each program is still traced and lowered,
seconds per forward bucket of a 30-layer model on a CPU. This cache keeps each compiled program as
`jax.experimental.serialize_executable` bytes in `<compilation cache dir>/executables/<key>.bin`, where the key
is a sha256 of the program's name and shapes, the engine's `signature` (model config, dtypes, pool shape,
attention kernel, ...), the jax and jaxlib versions, the devices, `XLA_FLAGS` (compiler options change the
program) and the source of every module of the package (a code change invalidates everything). A file is written
to a temporary name and renamed into place, and starts with the sha256 of its payload: a truncated, corrupt or
unreadable file is deleted and the program compiled again.
A folder that cannot be written is used read-only (one warning); nothing here ever stops the engine.

NOTE: while this cache can write, JAX's persistent cache is turned off for the process: an XLA:CPU executable
loaded from JAX's cache serializes without its kernels ("Function ... not found" when run after loading), so every
program saved here must come from a fresh compile. A read-only folder leaves JAX's cache on.
"""

import functools
import hashlib
import importlib
import logging
import os
import pathlib
import pickle
import tempfile
from collections.abc import Callable

import jax
import jaxlib
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

logger = logging.getLogger(__name__)

_DIGEST = 32  # sha256 bytes at the head of each file


@functools.cache
def _source_digest() -> str:
    """sha256 of every .py file of the installed package (its engine, models and kernels)."""
    root = pathlib.Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for folder in sorted({root, *(pathlib.Path(p).resolve() for p in _subpackage_dirs())}):
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _subpackage_dirs() -> list[str]:
    import jaxpaged.kernels
    import jaxpaged.models

    return [os.path.dirname(jaxpaged.kernels.__file__), os.path.dirname(jaxpaged.models.__file__)]


def _load_kernel_runtimes() -> None:
    """Makes the Mosaic GPU runtime findable before programs are deserialized: importing
    `jax.experimental.mosaic.gpu` sets the variable its kernels locate the runtime library by, and a program
    loaded before any Mosaic kernel was compiled in the process otherwise fails to link ("Symbols not found:
    mosaic_gpu_init_tma_desc")."""
    if jax.default_backend() != "gpu":
        return
    try:
        importlib.import_module("jax.experimental.mosaic.gpu")
    except ImportError:  # a jaxlib without Mosaic GPU: its kernels cannot be in any program either
        pass


class ExecutableCache:
    """`get(name, compile_fn)`: the compiled program `name` from disk, else `compile_fn()`, then saved."""

    def __init__(self, folder: str | None, signature: str):
        self.folder = folder
        devices = [d.device_kind for d in jax.devices()]
        self._salt = repr((signature, jax.__version__, jaxlib.__version__, jax.default_backend(), devices,
                           os.environ.get("XLA_FLAGS", ""), _source_digest()))
        self._writable = folder is not None and self._can_write()
        if folder is not None:
            _load_kernel_runtimes()
        if self._writable:
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()  # JAX decides once whether its cache is used: decide again
        self.hits = self.misses = 0

    def _can_write(self) -> bool:
        try:
            os.makedirs(self.folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.folder):
                return True
        except OSError as e:
            logger.warning("Cannot write compiled programs to %s (%s); each start compiles them again (JAX's "
                           "compilation cache still saves the XLA compile).", self.folder, e)
            return False

    def _path(self, name: tuple) -> str:
        key = hashlib.sha256(repr((self._salt, name)).encode()).hexdigest()
        return os.path.join(self.folder, f"{key}.bin")

    def get(self, name: tuple, compile_fn: Callable[[], jax.stages.Compiled]) -> jax.stages.Compiled:
        if self.folder is None:
            return compile_fn()
        path = self._path(name)
        program = self._load(path)
        if program is not None:
            self.hits += 1
            return program
        self.misses += 1
        program = compile_fn()
        self._store(path, program)
        return program

    def _load(self, path: str) -> jax.stages.Compiled | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("Cannot read the compiled-program cache file %s (%s); compiling instead.", path, e)
            return None
        payload = data[_DIGEST:]
        try:
            if hashlib.sha256(payload).digest() != data[:_DIGEST]:
                raise ValueError("checksum mismatch (truncated or corrupt)")
            serialized, in_tree, out_tree, device_ids = pickle.loads(payload)
            by_id = {d.id: d for d in jax.devices()}
            return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree,
                                                             execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # noqa: BLE001  any unusable entry is rebuilt, never used
            logger.warning("Discarding the compiled-program cache file %s: %s", path, e)
            try:
                os.remove(path)
            except OSError:
                pass
            return None

    def _store(self, path: str, program: jax.stages.Compiled) -> None:
        if not self._writable:
            return
        try:
            # the devices it runs on, in order: loading would otherwise spread it over all of the host's devices
            device_ids = [d.id for d in program._executable._unloaded_executable.device_list]
            payload = pickle.dumps((*serialize_executable.serialize(program), device_ids))
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        except Exception as e:  # noqa: BLE001  a cache that cannot be written only costs the next start time
            self._writable = False
            logger.warning("Cannot write compiled programs to %s (%s); later starts will compile them again.",
                           self.folder, e)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
