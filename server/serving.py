"""/v1/completions and /v1/chat/completions: request -> engine requests -> JSON or SSE, as vLLM serves them."""

import json
import time
import uuid
from collections.abc import AsyncIterator

from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.server.async_engine import AsyncLLMEngine
from jaxpaged.server.metrics import RequestTimer
from jaxpaged.server.protocol import ChatCompletionRequest, CompletionRequest


class BadRequest(ValueError):
    """A request error reported as HTTP 400 (`param` names the field when known)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Serving:
    """Turns OpenAI requests into engine requests; one instance per app."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics

    # ---- shared -------------------------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if requested is None:
            requested = room
        if prompt_len + requested > self.max_model_len or room < 1:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
                "Please reduce the length of the messages or completion.", "max_tokens")
        return requested

    def _check_tokens(self, ids: list[int]) -> None:
        if not ids:
            raise BadRequest("The prompt is empty.", "prompt")
        vocab = self.engine.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"Token ids must be in [0, {vocab}).", "prompt")

    async def _run(self, prompt, params, request_id: str, timer: RequestTimer) -> AsyncIterator[RequestOutput]:
        async for out in self.engine.generate(prompt, params, request_id):
            timer.on_output(sum(len(c.token_ids) for c in out.outputs))
            yield out
        timer.finish()

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- completions --------------------------------------------------------------------------------------------

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) for each prompt of a completion request."""
        p = req.prompt
        tok = self.engine.tokenizer
        if isinstance(p, str):
            items = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [p]
        else:
            items = list(p)
        if not items:
            raise BadRequest("prompt must not be empty", "prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append((item, tok.encode(item)))
            else:
                prompts.append((None, list(item)))
            self._check_tokens(prompts[-1][1])
        return prompts

    async def completion(self, req: CompletionRequest):
        """Returns the response dict, or an async iterator of SSE strings when streaming."""
        prompts = self.completion_prompts(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        subs = []
        for i, (text, ids) in enumerate(prompts):
            params = req.sampling_params(self._max_tokens(req.max_tokens or 16, len(ids)), req.logprobs)
            subs.append((f"{request_id}-{i}", text, ids, params))
        if req.stream:
            return self._stream_completion(req, request_id, created, subs)
        choices, usage = [], self._usage(0, 0, 0)
        for i, (sub_id, text, ids, params) in enumerate(subs):
            final = None
            async for final in self._run({"prompt": text, "prompt_token_ids": ids}, params, sub_id,
                                         self.metrics.timer()):
                pass
            for c in final.outputs:
                choices.append(self._completion_choice(req, i * req.n + c.index, c, text, 0, len(c.token_ids)))
            self._add_usage(usage, final)
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}

    def _completion_choice(self, req, index: int, c: CompletionOutput, prompt_text, start_tok: int, end_tok: int,
                           text: str | None = None) -> dict:
        text = c.text if text is None else text
        if req.echo and prompt_text and start_tok == 0:
            text = prompt_text + text
        choice = {"index": index, "text": text, "logprobs": None,
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if req.logprobs is not None and c.logprobs:
            choice["logprobs"] = self._completion_logprobs(c, start_tok, end_tok)
        return choice

    def _completion_logprobs(self, c: CompletionOutput, start: int, end: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = 0
        for token_id, lps in zip(c.token_ids[start:end], c.logprobs[start:end]):
            piece = self._piece(token_id)
            tokens.append(piece)
            token_lps.append(lps[token_id].logprob)
            tops.append({self._piece(t): lp.logprob for t, lp in lps.items()})
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _piece(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    @staticmethod
    def _add_usage(usage: dict, out: RequestOutput) -> None:
        completion = sum(len(c.token_ids) for c in out.outputs)
        usage["prompt_tokens"] += len(out.prompt_token_ids)
        usage["completion_tokens"] += completion
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        usage["prompt_tokens_details"]["cached_tokens"] += out.num_cached_tokens

    async def _stream_completion(self, req, request_id, created, subs) -> AsyncIterator[str]:
        usage = self._usage(0, 0, 0)
        try:
            for i, (sub_id, text, ids, params) in enumerate(subs):
                sent = {}  # choice index -> (chars, tokens) already sent
                final = None
                async for out in self._run({"prompt": text, "prompt_token_ids": ids}, params, sub_id,
                                           self.metrics.timer()):
                    final = out
                    for c in out.outputs:
                        chars, toks = sent.get(c.index, (0, 0))
                        if len(c.text) == chars and len(c.token_ids) == toks and not c.finish_reason:
                            continue
                        choice = self._completion_choice(req, i * req.n + c.index, c, text, toks,
                                                         len(c.token_ids), c.text[chars:])
                        sent[c.index] = (len(c.text), len(c.token_ids))
                        yield sse({"id": request_id, "object": "text_completion", "created": created,
                                   "model": self.model_name, "choices": [choice]})
                self._add_usage(usage, final)
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": request_id, "object": "text_completion", "created": created,
                           "model": self.model_name, "choices": [], "usage": usage})
        except Exception as e:
            yield sse({"error": {"message": str(e), "type": "InternalServerError", "param": None, "code": 500}})
        yield sse("[DONE]")

    # ---- chat ---------------------------------------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        tok = self.engine.tokenizer
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, chat_template=req.chat_template,
                                           add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message)
        except Exception as e:
            raise BadRequest(f"cannot apply the chat template: {e}", "messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        self._check_tokens(ids)
        return text, ids

    async def chat(self, req: ChatCompletionRequest):
        text, ids = self.chat_prompt(req)
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(ids))
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
        params = req.sampling_params(max_tokens, (top or 0) if req.logprobs else None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt = {"prompt": text, "prompt_token_ids": ids}
        if req.stream:
            return self._stream_chat(req, request_id, created, prompt, params)
        final = None
        async for final in self._run(prompt, params, request_id, self.metrics.timer()):
            pass
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c, 0, req.top_logprobs or 0) if req.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in final.outputs]
        usage = self._usage(0, 0, 0)
        self._add_usage(usage, final)
        return {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}

    def _chat_logprobs(self, c: CompletionOutput, start: int, top: int) -> dict:
        """OpenAI chat logprobs of tokens [start:]: each sampled token with its `top` most likely alternatives."""
        content = []
        for token_id, lps in zip(c.token_ids[start:], c.logprobs[start:]):
            entry = self._chat_token(token_id, lps[token_id].logprob)
            ranked = sorted((lp.rank, t, lp.logprob) for t, lp in lps.items() if lp.rank <= top)
            entry["top_logprobs"] = [self._chat_token(t, lp) for _, t, lp in ranked]
            content.append(entry)
        return {"content": content}

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        piece = self._piece(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    async def _stream_chat(self, req, request_id, created, prompt, params) -> AsyncIterator[str]:
        def chunk(choices, **extra):
            return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name, "choices": choices, **extra})

        sent: dict[int, tuple[int, int]] = {}
        final = None
        try:
            async for out in self._run(prompt, params, request_id, self.metrics.timer()):
                final = out
                for c in out.outputs:
                    chars, toks = sent.get(c.index, (0, 0))
                    if len(c.text) == chars and len(c.token_ids) == toks and not c.finish_reason:
                        continue
                    delta = {"content": c.text[chars:]}
                    if c.index not in sent:
                        delta = {"role": "assistant", **delta}
                    sent[c.index] = (len(c.text), len(c.token_ids))
                    yield chunk([{"index": c.index, "delta": delta,
                                  "logprobs": (self._chat_logprobs(c, toks, req.top_logprobs or 0)
                                               if req.logprobs else None),
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
            if req.stream_options and req.stream_options.include_usage:
                usage = self._usage(0, 0, 0)
                self._add_usage(usage, final)
                yield chunk([], usage=usage)
        except Exception as e:
            yield sse({"error": {"message": str(e), "type": "InternalServerError", "param": None, "code": 500}})
        yield sse("[DONE]")
