"""AsyncLLMEngine: the synchronous LLMEngine driven by one background thread, with an asyncio queue per request."""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from jaxpaged.config import EngineArgs
from jaxpaged.engine import LLMEngine, PromptType
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Owns an LLMEngine on a background thread.

    The thread builds the engine (model load + compilation), then loops: drain the inbox of add/abort commands
    (blocking when there is no work), run one `step()`, hand each output to its request's asyncio queue through
    `loop.call_soon_threadsafe`. A failing `add_request` fails that request only; a failing step fails the requests
    in flight and the loop goes on.
    """

    def __init__(self, args: EngineArgs, engine: LLMEngine | None = None):
        self.args = args
        self.engine = engine
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout=30)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs until the request finishes; closing the iterator aborts it."""
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(("add", request_id, (prompt, params)))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id, None))

    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(self.args)
        except BaseException as e:  # surfaced by /health and the server start-up
            logger.exception("Engine start-up failed")
            self.start_error = e
            return
        finally:
            self.ready.set()
        while self._drain(block=not self.engine.has_unfinished_requests()):
            try:
                outputs = self.engine.step()
            except Exception as e:
                logger.exception("Engine step failed; failing the requests in flight")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, out.finished)

    def _drain(self, block: bool) -> bool:
        """Applies queued commands; returns False on shutdown."""
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for kind, request_id, payload in commands:
            if kind == "stop":
                return False
            if kind == "abort":
                self.engine.abort_request([request_id])
            elif request_id in self._streams:
                try:
                    self.engine.add_request(request_id, *payload)
                except Exception as e:
                    self._deliver(request_id, e, True)
        return True

    def _fail_all(self, error: Exception) -> None:
        ids = list(self.engine.groups)
        self.engine.abort_request(ids)
        for request_id in ids:
            self._deliver(request_id, RuntimeError(f"engine step failed: {error}"), True)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        entry = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if entry is not None:
            loop, outputs = entry
            loop.call_soon_threadsafe(outputs.put_nowait, item)
