"""`python -m jaxpaged.server ARGS` with a wall-clock time on every log line and one INFO line per start-up phase,
to break a server's start down (serving.py --launch --timed-server runs the server through this).

Phases logged (logger `timed_server`): the process's age when this script starts, the imports (jax, the engine,
the server app, uvicorn), and inside `LLMEngine(...)`: `load_model`, `load_tokenizer`, `num_pages_for` (the KV
pool sizing, which compiles or loads the activation-measuring program), `allocate_kv_pool`, `warm_up` (the step
programs). The server itself runs unchanged: the phases are timed by wrapping those functions from outside.
The environment defaults that the server's main sets before JAX starts are set here first, since this script
starts JAX (jax.devices()) before calling it: without XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX takes its default
0.75 of the device, the KV pool comes out smaller and the step programs miss the executable cache.
"""

import time

T0 = time.perf_counter()

import functools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # as jaxpaged.server.cli.main, before JAX starts
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                    format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("timed_server")


def process_age() -> float:
    """Seconds since this process was started (from /proc), or -1 where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return -1.0


def timed(owner, name: str, label: str) -> None:
    """Replaces owner.name by a wrapper that logs its start and its seconds."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        log.info("%s: start", label)
        try:
            return fn(*args, **kwargs)
        finally:
            log.info("%s: %.2f s", label, time.perf_counter() - start)

    setattr(owner, name, wrapper)


def imported(module: str) -> None:
    start = time.perf_counter()
    __import__(module)
    log.info("import %s: %.2f s", module, time.perf_counter() - start)


def main() -> int:
    log.info("process age at script start: %.2f s (interpreter start-up)", process_age() - (time.perf_counter() - T0))
    for module in ("jax", "jaxpaged.engine", "jaxpaged.server.app", "jaxpaged.server.async_engine", "uvicorn"):
        imported(module)
    import jax

    start = time.perf_counter()
    devices = jax.devices()
    log.info("jax.devices() (backend init): %.2f s, %s", time.perf_counter() - start, devices)

    import jaxpaged.engine as engine
    from jaxpaged.runner import ModelRunner
    from jaxpaged.server.cli import main as serve

    timed(engine, "load_model", "model init (load_model)")
    timed(engine, "load_tokenizer", "tokenizer")
    timed(engine, "num_pages_for", "KV pool sizing (num_pages_for, activation program)")
    timed(ModelRunner, "allocate_kv_pool", "KV pool allocation")
    timed(engine.LLMEngine, "__init__", "LLMEngine(...)")
    timed(engine.LLMEngine, "warm_up", "warm_up (step programs)")
    log.info("before the server's main: process age %.2f s", process_age())
    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
