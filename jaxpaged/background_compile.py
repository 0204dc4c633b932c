"""The background warm-up (`ModelRunner.warm_up(background=True)`): which step programs compile before the engine
is ready, the order the others compile in afterwards, and the threads that compile them."""

import logging
import sys
import threading
import time

from jaxpaged.sampler import SamplerFlags

logger = logging.getLogger(__name__)

_FLAGS_AT = {"sample": 2, "decode": 3}  # where a program key holds its SamplerFlags


def in_ready_set(key: tuple, first_token_sizes) -> bool:
    """Whether `warm_up(background=True)` compiles program `key` before it returns: the forward programs of
    `first_token_sizes`, the samplers that stand in for the others (one with and one without filters per sequence
    bucket: `wider_key`), the update and the copy; not the multi-step decodes."""
    kind = key[0]
    if kind == "forward":
        return key[1] in first_token_sizes
    if kind == "sample":
        return wider_key(key) == key
    return kind != "decode"


def background_order(key: tuple) -> int:
    """Rank of a program the background compiles: the multi-step decodes that stand in for the others (0), the
    forward buckets (1), the samplers (2), the other decodes (3)."""
    kind = key[0]
    if kind == "decode":
        return 0 if wider_key(key) == key else 3
    return 2 if kind == "sample" else 1


def wider_key(key: tuple) -> tuple:
    """The sampler or multi-step decode program that stands in for program `key` while that one compiles: the same
    program whose sampler also samples at random and computes logprobs. Its tokens are the same (greedy rows take
    the argmax either way; rows that did not ask for logprobs ignore them)."""
    at = _FLAGS_AT[key[0]]
    flags: SamplerFlags = key[at]
    return (*key[:at], SamplerFlags(True, flags.filter, True), *key[at + 1:])


class BackgroundCompiler:
    """Compiles `keys` into `runner.executables` in `THREADS` threads, in order, and calls `on_first` once every
    key of `first` is compiled (never when one of them failed: the steps keep their fallback). A worker stops
    between programs once the main thread has ended (interpreter exit waits only for the programs in progress).

    Tracing and lowering hold the GIL, which the engine thread needs for every step it runs meanwhile: each time
    it takes the GIL back (after every device call or wait) it waits for the running thread to hand it over, up
    to the interpreter's switch interval (5 ms by default). While this compiler runs, the switch interval is
    `SWITCH_INTERVAL` (restored when the last program is done), and few threads compile. On an H100 a server's
    TPOT during the background compile was 21.3 ms before this and 12.8 ms after (RESULTS.md; single steps and
    larger buckets account for part of it).
    """

    THREADS = 2
    SWITCH_INTERVAL = 1e-4  # seconds

    def __init__(self, runner, keys: list[tuple], first: list[tuple], on_first):
        self._runner, self._keys, self._on_first = runner, list(keys), on_first
        self._lock = threading.Lock()
        self._left, self._first, self._num_first, self._failed = len(self._keys), set(first), len(first), False
        self._start = time.perf_counter()
        if not self._first:
            on_first()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, self.SWITCH_INTERVAL))
        workers = max(1, min(len(keys), self.THREADS))
        logger.info("Compiling %d more step programs in %d background threads.", len(keys), workers)
        # never daemons (a thread inherits its creator's flag; the server's engine thread is one): a daemon killed
        # mid-compile at interpreter exit aborts the process ("terminate called ... exception not rethrown")
        self._threads = [threading.Thread(target=self._work, name=f"jaxpaged-compile-{i}", daemon=False)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _next(self) -> tuple | None:
        with self._lock:
            return self._keys.pop(0) if self._keys and threading.main_thread().is_alive() else None

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                key, program = self._runner._compile(key)
                self._runner.executables[key] = program
                ok = True
            except Exception:  # noqa: BLE001  the step keeps its fallback (a larger bucket, single steps)
                logger.exception("Background compilation of step program %s failed", key)
                self._failed, ok = True, False
            with self._lock:
                self._left -= 1
                done = self._left == 0
                first_done = ok and key in self._first and len(self._first) == 1
                if ok:
                    self._first.discard(key)
            if first_done:
                logger.info("Background compilation: the first %d programs compiled %.1f s after ready.",
                            self._num_first, time.perf_counter() - self._start)
                self._on_first()
            if done:
                sys.setswitchinterval(self._switch_interval)
                if self._failed:
                    logger.warning("Background compilation done with failures: steps that need the failed programs "
                                   "keep running in larger buckets or as single steps.")
                    return
                logger.info("Background compilation done: all step programs compiled %.1f s after ready.",
                            time.perf_counter() - self._start)

    @property
    def done(self) -> bool:
        """Whether every program was compiled (or failed)."""
        return self._left == 0

    def join(self) -> None:
        for t in self._threads:
            t.join()
