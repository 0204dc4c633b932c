"""`LLM`: vLLM's offline API (`generate`, `chat`, `get_metrics`) over an LLMEngine."""

import functools
from collections.abc import Sequence

from tqdm.auto import tqdm

from jaxpaged.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from jaxpaged.config import EngineArgs
from jaxpaged.engine import CheckedPrompt, LLMEngine, PromptType
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """An LLM with a paged KV cache, continuous batching and prefix caching, as `vllm.LLM`.

    `LLM()` with no model loads the embedded SmolLM2-135M-Instruct. Keyword arguments are `EngineArgs` fields
    (vLLM's names: dtype, max_model_len, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, block_size,
    enable_prefix_caching, num_gpu_blocks_override, seed, load_format, tensor_parallel_size, ...).
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._counter = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for one or many prompts; returns RequestOutputs in input order.

        Each prompt is tokenized and validated as it is queued: those that can fill the first step before it, the
        rest while the device runs it (the first step admits in order up to that budget either way, unless
        prefix-cache hits leave it room for more, which then join a step later). A bad prompt raises ValueError
        naming its index, after the requests queued before it are aborted and any step already running for them
        is collected, so the engine is left with none of them (as vLLM's `LLM`, which aborts what it added).
        """
        prompts = self._prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts; "
                                 "give one SamplingParams or one per prompt.")
        engine = self.llm_engine
        for p in {id(p): p for p in params}.values():
            engine.check_num_seqs(p.n, "n")
        ids = self._new_ids(len(prompts))

        def add(i: int, request_id: str, checked: CheckedPrompt) -> None:
            p = params[i].clone()
            p.output_kind = RequestOutputKind.FINAL_ONLY  # as vLLM's LLM: one output per request, built once
            engine.add_request(request_id, checked, p)

        return self._run(ids, use_tqdm, functools.partial(self._queue, prompts, ids, add))

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search of each prompt (vLLM's `LLM.beam_search`, algorithm in `jaxpaged.beam_search`); the
        prompts run together, continuously batched with any other work. Returns one BeamSearchOutput per prompt,
        its sequences best first (`tokens` holds prompt and output, as in vLLM). Prompts are checked as they are
        queued, as in `generate`: a bad one, or one whose beams cannot fit the pool, raises ValueError naming its
        index after the requests queued before it are aborted."""
        prompts = self._prompt_list(prompts)
        engine = self.llm_engine
        engine.check_num_seqs(params.beam_width, "beam_width")
        ids = self._new_ids(len(prompts))

        def add(i: int, request_id: str, checked: CheckedPrompt) -> None:
            engine.add_beam_request(request_id, checked, params)

        results = []
        for out in self._run(ids, use_tqdm, functools.partial(self._queue, prompts, ids, add)):
            results.append(BeamSearchOutput([
                BeamSearchSequence(out.prompt_token_ids + c.token_ids, c.logprobs, c.cumulative_logprob, c.text,
                                   c.finish_reason, c.stop_reason) for c in out.outputs]))
        return results

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"}) or a list of conversations,
        formatted with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.llm_engine.tokenizer
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    @staticmethod
    def _prompt_list(prompts) -> list:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def _queue(self, prompts: list, ids: list[str], add, i: int) -> int:
        """Checks prompt `i`, queues it as request `ids[i]` with `add(i, ids[i], checked prompt)` and returns its
        length. If either raises, the requests queued before it are aborted first (`_discard`); a ValueError then
        names prompt `i`."""
        try:
            checked = self.llm_engine.check_prompt(prompts[i])
            add(i, ids[i], checked)
        except Exception as e:
            self._discard(ids[:i])
            if isinstance(e, ValueError):
                raise ValueError(f"prompt {i}: {e}") from None
            raise
        return len(checked.token_ids)

    def _discard(self, ids: list[str]) -> None:
        """Aborts requests `ids` and runs the engine until nothing is left in it (the step in flight collected)."""
        engine = self.llm_engine
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()

    def get_metrics(self):
        """vLLM-named metrics (objects with .name and .value)."""
        return self.llm_engine.get_metrics()

    def _new_ids(self, count: int) -> list[str]:
        ids = [str(self._counter + i) for i in range(count)]
        self._counter += count
        return ids

    def _run(self, ids: list[str], use_tqdm: bool, queue) -> list[RequestOutput]:
        """Steps until the requests `ids` are done; their outputs in that order. `queue(i)` queues request i and
        returns its prompt length: requests up to one step's token budget or sequence limit are queued before the
        first step, the others right after it is launched."""
        engine = self.llm_engine
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        queued, tokens = 0, 0
        while queued < len(ids) and tokens < engine.scheduler.max_num_batched_tokens \
                and queued < engine.scheduler.max_num_seqs:
            tokens += queue(queued)
            queued += 1
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():  # as vLLM: also collects the async step past the last token
                outputs = engine.step()
                for i in range(queued, len(ids)):  # while the first step runs
                    queue(i)
                queued = len(ids)
                for out in outputs:
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]
