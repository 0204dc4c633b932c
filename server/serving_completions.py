"""POST /v1/completions: prompts -> engine requests -> a CompletionResponse or SSE chunks, as vLLM serves them."""

from collections.abc import AsyncIterator

from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.server.protocol import (CompletionLogProbs, CompletionRequest, CompletionResponse,
                                      CompletionResponseChoice, CompletionStreamResponse, UsageInfo)
from jaxpaged.server.serving_base import (APIError, DeltaAccumulator, OpenAIServing, merge_async_iterators,
                                         random_id, sse)


class OpenAIServingCompletion(OpenAIServing):
    """Each prompt of a request is one engine request `{id}-{i}`; its `n` choices get indices `i * n + j`."""

    def prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) of each prompt; a string, token ids, or a list of either."""
        p = req.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise APIError("The prompt is empty; give at least one prompt.", "prompt")
        prompts = []
        for item in items:
            text, ids = (item, self.encode(item, "prompt")) if isinstance(item, str) else (None, list(item))
            self.check_prompt(ids, "prompt")
            prompts.append((text, ids))
        return prompts

    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Validates everything first (APIError), then runs; returns the response or a primed SSE iterator."""
        self.check_model(req.model)
        prompts = self.prompts(req)
        subs = [({"prompt": text, "prompt_token_ids": ids} if text is not None else {"prompt_token_ids": ids},
                 self.sampling_params(req, self.max_tokens(req.max_tokens, len(ids)), req.logprobs))
                for text, ids in prompts]
        request_id = random_id("cmpl")
        outputs = merge_async_iterators(*(self.generate(prompt, params, f"{request_id}-{i}")
                                          for i, (prompt, params) in enumerate(subs)))
        if req.stream:
            return self._stream(req, request_id, prompts, outputs)
        finals = [DeltaAccumulator() for _ in prompts]
        async for i, out in outputs:
            finals[i].add(out)
        return self._response(req, request_id, prompts, [f.result() for f in finals])

    def _response(self, req, request_id: str, prompts, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, ((text, ids), out) in enumerate(zip(prompts, finals)):
            for c in out.outputs:
                choices.append(self._choice(req, i * req.n + c.index, c, self._echo(req, text, ids), 0,
                                            ids, out.prompt_logprobs))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=self._usage(finals))

    @staticmethod
    def _usage(finals: list[RequestOutput]) -> UsageInfo:
        usage = UsageInfo()
        for out in finals:
            usage.add(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens)
        return usage

    def _echo(self, req, text: str | None, ids: list[int]) -> str:
        if not req.echo:
            return ""
        return text if text is not None else self.engine.tokenizer.decode(ids)

    def _choice(self, req, index: int, c: CompletionOutput, prefix: str, offset: int, prompt_ids: list[int] = (),
                prompt_logprobs=None) -> CompletionResponseChoice:
        """Choice `c` (a whole completion, or a delta whose text starts at character `offset` of the choice),
        `prefix` (the echo) in front; with echo and logprobs the prompt tokens' logprobs come first."""
        logprobs = None
        if req.logprobs is not None and (c.logprobs or prefix):
            logprobs = CompletionLogProbs()
            if prefix and prompt_logprobs:
                self._add_logprobs(logprobs, prompt_ids, prompt_logprobs, offset)
            self._add_logprobs(logprobs, c.token_ids, c.logprobs or [], offset + len(prefix))
        return CompletionResponseChoice(index=index, text=prefix + c.text, logprobs=logprobs,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def _add_logprobs(self, lp: CompletionLogProbs, token_ids: list[int], entries: list, offset: int) -> None:
        """Legacy completions logprobs of tokens: text pieces, their logprobs, top alternatives (null for the
        first prompt token, which has none)."""
        for token_id, top in zip(token_ids, entries):
            piece = self.piece(token_id)
            lp.tokens.append(piece)
            lp.token_logprobs.append(None if top is None else top[token_id].logprob)
            lp.top_logprobs.append(None if top is None else {self.piece(t): x.logprob for t, x in top.items()})
            lp.text_offset.append(offset)
            offset += len(piece)

    async def _stream(self, req, request_id: str, prompts, outputs) -> AsyncIterator[str]:
        """SSE chunks: one per choice that progressed (text delta, new tokens' logprobs), then usage, then [DONE]."""
        sent: dict[int, int] = {}  # choice index -> characters already sent (the echo included)
        done: set[int] = set()
        finals = [DeltaAccumulator() for _ in prompts]
        async for i, out in outputs:  # DELTA outputs: each carries only what is new
            finals[i].add(out)
            for c in out.outputs:
                index = i * req.n + c.index
                if index in done or (not c.text and not c.token_ids and not c.finished()):
                    continue
                prefix = self._echo(req, *prompts[i]) if index not in sent else ""
                chars = sent.get(index, 0)
                sent[index] = chars + len(prefix) + len(c.text)
                if c.finished():
                    done.add(index)
                choice = self._choice(req, index, c, prefix, chars, prompts[i][1], finals[i].prompt_logprobs)
                yield sse(CompletionStreamResponse(id=request_id, model=self.model_name, choices=[choice]))
        if req.include_usage:
            usage = self._usage([f.result() for f in finals])
            yield sse(CompletionStreamResponse(id=request_id, model=self.model_name, choices=[], usage=usage))
        yield sse("[DONE]")
