"""What completions and chat share: request validation before the engine, SSE framing, metrics timing, merging."""

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from jaxpaged.beam_search import BeamSearchParams
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.server.async_engine import AsyncLLMEngine
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error answered with `ErrorResponse` and `status` (400 unless said otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.param, self.status, self.err_type = message, param, status, err_type

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.err_type, param=self.param,
                                             code=self.status))


def sse(chunk: BaseModel | str) -> str:
    """One Server-Sent Event: `data: {json}\\n\\n`."""
    data = chunk if isinstance(chunk, str) else chunk.model_dump_json()
    return f"data: {data}\n\n"


def error_event(e: Exception) -> str:
    """The error chunk of a stream that failed after its 200 response started (vLLM sends the same)."""
    err = e if isinstance(e, APIError) else APIError(str(e), status=500, err_type="InternalServerError")
    return sse(err.body())


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def merge_async_iterators(*iterators: AsyncIterator) -> AsyncIterator[tuple[int, object]]:
    """Yields (i, item) from all iterators as items arrive; closing the merge cancels (so aborts) the rest."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    inbox: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator) -> None:
        try:
            async for item in it:
                await inbox.put((i, item))
            await inbox.put((i, done))
        except Exception as e:
            await inbox.put((i, e))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await inbox.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """Base of the completions and chat handlers: model name, limits and the checks done before the engine."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(f"The model `{name}` does not exist.", "model", 404, "NotFoundError")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"Token id {bad} is out of vocabulary (valid ids are 0..{vocab - 1}).", param)

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError("The prompt is empty; give at least one token.", param)
        self.check_token_ids(ids, param)

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:  # e.g. lone surrogates the tokenizer cannot take
            raise APIError(f"cannot tokenize {param}: {e}", param) from None

    def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """`requested`, or all the room left when None (vLLM); 400 with vLLM's message when it does not fit."""
        max_len = self.engine.max_model_len
        tokens = max_len - prompt_len if requested is None else requested
        if tokens < 1 or prompt_len + tokens > max_len:
            raise APIError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + max(tokens, 1)} tokens ({prompt_len} in the messages, {max(tokens, 1)} in the "
                "completion). Please reduce the length of the messages or completion.", "max_tokens")
        return tokens

    def sampling_params(self, req, max_tokens: int, logprobs: int | None) -> SamplingParams | BeamSearchParams:
        """The request's SamplingParams, asking the engine for DELTA outputs (what is new since the previous
        one): a step then costs O(new tokens) per request, and latency metrics see every token as it arrives.
        With `use_beam_search`, BeamSearchParams (one output, at the end)."""
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        try:
            if req.use_beam_search:
                return req.to_beam_search_params(max_tokens)
            params = req.to_sampling_params(max_tokens, logprobs, self.engine.vocab_size)
        except ValueError as e:
            raise APIError(str(e)) from None
        params.output_kind = RequestOutputKind.DELTA
        return params

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one prompt, timed for the TTFT / inter-token / e2e histograms."""
        timer, generated = self.metrics.timer(), 0
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                generated += sum(len(c.token_ids) for c in out.outputs)
                timer.on_output(generated)
                yield out
        except ValueError as e:  # the engine's own validation: still the client's error
            raise APIError(str(e)) from None
        timer.finish()

    def piece(self, token_id: int) -> str:
        """A token's text as OpenAI's logprobs show it."""
        return self.engine.tokenizer.decode([token_id])


class DeltaAccumulator:
    """Joins one request's DELTA outputs into the cumulative output they add up to (built once, at the end)."""

    def __init__(self):
        self._parts: dict[int, tuple[list[str], list[int], list | None]] = {}  # index -> texts, ids, logprobs
        self._last: RequestOutput | None = None
        self.prompt_logprobs = None  # DELTA outputs carry them once, in the first

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            texts, ids, lps = self._parts.setdefault(c.index, ([], [], None if c.logprobs is None else []))
            texts.append(c.text)
            ids.extend(c.token_ids)
            if lps is not None:
                lps.extend(c.logprobs or [])
        self._last = out

    def result(self) -> RequestOutput:
        """The cumulative output of everything added (the last output's finish fields and counts)."""
        outputs = []
        for c in self._last.outputs:
            texts, ids, lps = self._parts[c.index]
            outputs.append(dataclasses.replace(c, text="".join(texts), token_ids=ids, logprobs=lps))
        return dataclasses.replace(self._last, outputs=outputs, prompt_logprobs=self.prompt_logprobs)
