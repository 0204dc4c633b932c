"""Compiled step programs saved to disk and loaded back: hits skip compiling, bad entries are rebuilt."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.executable_cache import ExecutableCache


def _program(calls: list):
    def compile_fn():
        calls.append(1)
        fn = jax.jit(lambda x, y: (x * 2 + y, jnp.broadcast_to(y.sum(), (3,))), donate_argnums=(0,))
        return fn.lower(jnp.zeros(4), jnp.zeros(4)).compile()
    return compile_fn


def _run(program):
    x, y = program(jnp.arange(4.0), jnp.ones(4))
    return np.asarray(x).tolist(), np.asarray(y).tolist()


def test_a_later_start_loads_the_program_without_compiling(tmp_path):
    calls = []
    first = ExecutableCache(str(tmp_path), "model-a")
    want = _run(first.get(("forward", 16, 8), _program(calls)))
    later = ExecutableCache(str(tmp_path), "model-a")
    got = _run(later.get(("forward", 16, 8), _program(calls)))
    assert got == want == ([1.0, 3.0, 5.0, 7.0], [4.0, 4.0, 4.0])
    assert len(calls) == 1 and (later.hits, later.misses) == (1, 0)
    assert len(glob.glob(str(tmp_path / "*.bin"))) == 1


def test_another_signature_or_program_compiles_its_own(tmp_path):
    calls = []
    ExecutableCache(str(tmp_path), "model-a").get(("forward", 16, 8), _program(calls))
    other = ExecutableCache(str(tmp_path), "model-b")
    other.get(("forward", 16, 8), _program(calls))
    other.get(("forward", 32, 8), _program(calls))
    assert len(calls) == 3 and other.misses == 2
    assert len(glob.glob(str(tmp_path / "*.bin"))) == 3


def test_other_xla_flags_compile_their_own(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nonexistent")  # read at construction only: not applied here
    ExecutableCache(str(tmp_path), "m").get(("p",), _program(calls))
    monkeypatch.setenv("XLA_FLAGS", "")
    ExecutableCache(str(tmp_path), "m").get(("p",), _program(calls))
    assert len(calls) == 2 and len(glob.glob(str(tmp_path / "*.bin"))) == 2


def test_a_truncated_or_corrupt_entry_is_rebuilt_never_used(tmp_path, caplog):
    calls = []
    ExecutableCache(str(tmp_path), "m").get(("p",), _program(calls))
    (path,) = glob.glob(str(tmp_path / "*.bin"))
    data = open(path, "rb").read()
    for bad in (data[: len(data) // 2], data[:40] + bytes([data[40] ^ 1]) + data[41:]):
        with open(path, "wb") as f:
            f.write(bad)
        with caplog.at_level(logging.WARNING):
            cache = ExecutableCache(str(tmp_path), "m")
            assert _run(cache.get(("p",), _program(calls))) == ([1.0, 3.0, 5.0, 7.0], [4.0, 4.0, 4.0])
        assert "Discarding" in caplog.text and "checksum" in caplog.text
        assert cache.misses == 1 and open(path, "rb").read() != bad  # written again, whole
    assert len(calls) == 3


def test_a_folder_that_cannot_be_written_only_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = []
    with caplog.at_level(logging.WARNING):
        cache = ExecutableCache(str(blocker / "executables"), "m")
        assert _run(cache.get(("p",), _program(calls))) == ([1.0, 3.0, 5.0, 7.0], [4.0, 4.0, 4.0])
    assert "Cannot write compiled programs" in caplog.text
    assert calls == [1] and not os.path.isdir(blocker / "executables")


def test_a_program_on_some_devices_loads_onto_the_same_ones(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()[2:4]  # the test suite's virtual CPU devices (tests/conftest.py)
    sharding = NamedSharding(Mesh(devices, ("model",)), PartitionSpec("model"))

    def compile_fn():
        spec = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)
        return jax.jit(lambda x: x * 2, out_shardings=sharding).lower(spec).compile()

    ExecutableCache(str(tmp_path), "m").get(("p",), compile_fn)
    later = ExecutableCache(str(tmp_path), "m")
    out = later.get(("p",), compile_fn)(jax.device_put(jnp.arange(4.0), sharding))
    assert later.hits == 1 and out.sharding.device_set == set(devices) and out.tolist() == [0.0, 2.0, 4.0, 6.0]
