"""AsyncLLMEngine: the synchronous LLMEngine driven by one background thread, with an asyncio queue per request."""

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from jaxpaged.beam_search import BeamSearchParams
from jaxpaged.config import EngineArgs
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while a request was in flight (the request is aborted; the server keeps serving)."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: bool = False  # the engine accepted it (only the engine thread sets this)


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


def _default_factory(args: EngineArgs, background_compile: bool = True):
    """The engine, warmed up: ready once every step can run; with `background_compile`, the programs that only
    make some steps faster compile after that (`LLMEngine.warm_up`)."""
    from jaxpaged.engine import LLMEngine

    engine = LLMEngine(args)
    engine.warm_up(background=background_compile)
    return engine


def _leader_channel(args: EngineArgs):
    """Process 0 of a multi-host group: the channel to its followers (None for one process)."""
    import jax

    if jax.process_count() == 1:
        return None
    from jaxpaged import distributed
    from jaxpaged.server.follower import LeaderChannel

    coordinator = distributed.group_from(args.coordinator_address, args.num_processes, args.process_id)[0]
    return LeaderChannel(coordinator, jax.process_count() - 1)


class AsyncLLMEngine:
    """Owns an LLMEngine on one background thread; the event loop never touches the engine or the device.

    The thread builds the engine (model load + warm-up compilation; `ready` is set afterwards), then loops: apply
    the inbox of add/abort commands (blocking on it while the engine has no work), run one `step()`, hand each
    output to its request's asyncio queue through `loop.call_soon_threadsafe`. A failing `add_request` fails that
    request only; a failing `step()` fails the requests in flight and the loop goes on. Metrics are snapshotted on
    the engine thread after every iteration, so a scrape never reads the engine's state from another thread.

    `engine_factory(args)` builds the engine (default: `LLMEngine`); tests pass a fake. In a multi-host group
    this runs on process 0 and forwards every applied command to the other processes (`server/follower.py`).
    """

    def __init__(self, args: EngineArgs | None = None, engine_factory: Callable | None = None,
                 background_compile: bool = True):
        self.args = args or EngineArgs()
        self._factory = engine_factory or functools.partial(_default_factory, background_compile=background_compile)
        self.engine = None
        self.ready = threading.Event()  # set when the engine is built (or failed: see start_error)
        self.start_error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams (event loop thread and engine thread)
        self._metrics: list = []
        self._thread: threading.Thread | None = None
        self._channel = None  # multi-host: the followers' command channel (server/follower.py)
        self._to_forward: list = []  # commands applied since the last message to the followers

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread (idempotent); returns at once, `ready` tells when the engine is built."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the loop after the current step; requests still in flight fail."""
        if self._thread is not None:
            self._inbox.put(("stop", None, None))
            self._thread.join(timeout)

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set() and self.start_error is None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        model = getattr(self.engine, "model", None)
        return model.config.vocab_size if model is not None else len(self.engine.tokenizer)

    def metrics(self) -> list:
        """The engine's `get_metrics()` as of the end of its last loop iteration (empty before start-up)."""
        return self._metrics

    # ---- requests (event loop side) -------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int] | dict, params: SamplingParams | BeamSearchParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yields the request's RequestOutputs (cumulative, deltas or only the final one, as `params.output_kind`
        asks; a beam search yields one, at the end) until it finishes.

        Raises ValueError if the engine rejects the request, EngineStepError if the engine fails while it runs.
        Leaving the iteration early (a client disconnect cancels the task; `aclose()`) aborts the request.
        """
        if not self.is_ready:
            raise RuntimeError("the engine is not ready")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._inbox.put(("add", request_id, (prompt, params)))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Forgets the request now and frees its pages on the engine thread's next iteration."""
        with self._lock:
            self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id, None))

    # ---- engine thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._factory(self.args)
            self._metrics = self.engine.get_metrics()
            self._channel = _leader_channel(self.args)
        except BaseException as e:  # reported by /health and the CLI
            logger.exception("Engine start-up failed")
            self.start_error = e
            return
        finally:
            self.ready.set()
        logger.info("Engine ready: %s, max_model_len=%d", self.engine.model_name, self.engine.max_model_len)
        while self._apply_commands(0.0 if self.engine.has_unfinished_requests() else self.engine.run_idle_work()):
            if self.engine.has_unfinished_requests():
                self._step()
            self._metrics = self.engine.get_metrics()
        self._fail_all(EngineStepError("the server is shutting down"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("Engine step failed; failing the requests in flight")
            self._fail_all(EngineStepError(f"engine step failed: {type(e).__name__}: {e}"))
            return
        self._deliver([(out.request_id, out, out.finished) for out in outputs])

    def _apply_commands(self, timeout: float | None) -> bool:
        """Applies queued add/abort commands, waiting up to `timeout` seconds for one (None: until one comes, 0:
        not at all); False on shutdown."""
        commands = []
        if timeout != 0:
            try:
                commands.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for kind, request_id, payload in commands:
            if kind == "stop":
                self._forward([(kind, None, None)])
                return False
            if kind == "abort":
                self._abort_in_engine([request_id])
            else:
                self._add(request_id, *payload)
        return self._forward([])

    def _forward(self, extra: list) -> bool:
        """Sends the followers (multi-host) what was applied since the last message; False if one is gone."""
        if self._channel is None:
            return True
        commands, self._to_forward = self._to_forward + extra, []
        try:
            self._channel.send(commands)
            return True
        except OSError as e:
            logger.error("A follower process left (%s); the engine stops.", e)
            self._fail_all(EngineStepError("a process of the multi-host group left"))
            return False

    def _add(self, request_id: str, prompt, params: SamplingParams | BeamSearchParams) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:  # aborted before the engine saw it
            return
        if self._channel is not None:
            self._to_forward.append(("add", request_id, (prompt, params)))
        try:
            if isinstance(params, BeamSearchParams):
                self.engine.add_beam_request(request_id, prompt, params)
            else:
                self.engine.add_request(request_id, prompt, params)
            stream.added = True
        except Exception as e:  # ValueError for a bad request; anything else is that request's failure too
            if not isinstance(e, ValueError):
                logger.exception("add_request(%s) failed", request_id)
            self._deliver([(request_id, e, True)])

    def _abort_in_engine(self, request_ids: list[str]) -> None:
        if self._channel is not None:
            self._to_forward += [("abort", request_id, None) for request_id in request_ids]
        try:
            self.engine.abort_request(request_ids)
        except Exception:
            logger.exception("abort_request(%s) failed", request_ids)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            ids = [rid for rid, s in self._streams.items() if s.added]
        self._abort_in_engine(ids)
        self._deliver([(request_id, error, True) for request_id in ids])

    def _deliver(self, items: list[tuple[str, object, bool]]) -> None:
        """Hands each (request id, output or error, whether it is the request's last) to the request's queue, with
        one wake-up per event loop for all of them (one per request cost ~1.4 ms per step of 256 requests)."""
        puts: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item, last in items:
                stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
                if stream is not None:
                    puts.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in puts.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
