"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request -> JSON or SSE."""

from collections.abc import AsyncIterator

from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                      ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogprobs,
                                      ChatLogprobsContent, ChatMessage, ChatResponseMessage, ChatTokenLogprob,
                                      DeltaMessage, UsageInfo)
from jaxpaged.server.serving_base import APIError, DeltaAccumulator, OpenAIServing, random_id, sse


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None) -> str:
    """The prompt text of `messages` under the model's chat template (or `chat_template`); APIError if it fails."""
    try:
        return tokenizer.apply_chat_template(
            [m.for_template() for m in messages], tokenize=False, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
    except Exception as e:  # template errors (jinja raise_exception, bad roles, no template) are the request's
        raise APIError(f"cannot apply the chat template: {type(e).__name__}: {e}", "messages") from None


class OpenAIServingChat(OpenAIServing):
    """Chat completions; the streamed first delta of each choice carries `role: assistant`."""

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Validates everything first (APIError), then runs; returns the response or an SSE iterator."""
        self.check_model(req.model)
        text = render_chat(self.engine.tokenizer, req.messages, req.add_generation_prompt,
                           req.continue_final_message, req.chat_template)
        ids = self.encode(text, "messages", add_special_tokens=False)  # the template has the special tokens
        self.check_prompt(ids, "messages")
        requested = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, self.max_tokens(requested, len(ids)), top)
        request_id = random_id("chatcmpl")
        outputs = self.generate({"prompt": text, "prompt_token_ids": ids}, params, request_id)
        if req.stream:
            return self._stream(req, request_id, outputs)
        final = DeltaAccumulator()
        async for out in outputs:
            final.add(out)
        return self._response(req, request_id, final.result())

    def _response(self, req, request_id: str, out: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatCompletionResponseChoice(
            index=c.index, message=ChatResponseMessage(content=c.text),
            logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in out.outputs]
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=self._usage(out))

    @staticmethod
    def _usage(out: RequestOutput) -> UsageInfo:
        usage = UsageInfo()
        usage.add(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens)
        return usage

    def _logprobs(self, c: CompletionOutput, top: int) -> ChatLogprobs | None:
        """OpenAI chat logprobs of c's tokens: each sampled token with its `top` most likely alternatives."""
        if c.logprobs is None:
            return None
        content = []
        for token_id, lps in zip(c.token_ids, c.logprobs):
            ranked = sorted((x.rank, t, x.logprob) for t, x in lps.items() if x.rank is not None and x.rank <= top)
            content.append(ChatLogprobsContent(**self._token(token_id, lps[token_id].logprob).model_dump(),
                                               top_logprobs=[self._token(t, lp) for _, t, lp in ranked]))
        return ChatLogprobs(content=content)

    def _token(self, token_id: int, logprob: float) -> ChatTokenLogprob:
        piece = self.piece(token_id)
        return ChatTokenLogprob(token=piece, logprob=logprob, bytes=list(piece.encode("utf-8", errors="replace")))

    async def _stream(self, req, request_id: str, outputs) -> AsyncIterator[str]:
        """One chunk per choice that progressed; the first of each has the role; then usage and [DONE]."""
        started: set[int] = set()  # choices whose first chunk (with the role) is sent
        done: set[int] = set()
        final = DeltaAccumulator()
        async for out in outputs:  # DELTA outputs: each carries only what is new
            final.add(out)
            for c in out.outputs:
                if c.index in done or (not c.text and not c.token_ids and not c.finished()):
                    continue
                delta = DeltaMessage(role=None if c.index in started else "assistant", content=c.text)
                started.add(c.index)
                if c.finished():
                    done.add(c.index)
                choice = ChatCompletionStreamChoice(
                    index=c.index, delta=delta,
                    logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                yield sse(ChatCompletionStreamResponse(id=request_id, model=self.model_name, choices=[choice]))
        if req.include_usage:
            yield sse(ChatCompletionStreamResponse(id=request_id, model=self.model_name, choices=[],
                                                   usage=self._usage(final.result())))
        yield sse("[DONE]")
