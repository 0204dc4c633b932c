"""`LLM`: vLLM's offline API (`generate`, `chat`, `get_metrics`) over an LLMEngine."""

from collections.abc import Sequence

from tqdm.auto import tqdm

from jaxpaged.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from jaxpaged.config import EngineArgs
from jaxpaged.engine import LLMEngine, PromptType
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

        Every prompt is validated before any is queued: a bad one raises ValueError naming its index and leaves
        the engine untouched.
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
        tokenized = self._tokenize_all(prompts)
        ids = []
        for prompt, p in zip(tokenized, params):
            ids.append(str(self._counter))
            self._counter += 1
            p = p.clone()
            p.output_kind = RequestOutputKind.FINAL_ONLY  # as vLLM's LLM: one output per request, built once
            engine.add_request(ids[-1], prompt, p)
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search of each prompt (vLLM's `LLM.beam_search`, algorithm in `jaxpaged.beam_search`); the
        prompts run together, continuously batched with any other work. Returns one BeamSearchOutput per prompt,
        its sequences best first (`tokens` holds prompt and output, as in vLLM)."""
        prompts = self._prompt_list(prompts)
        engine = self.llm_engine
        tokenized = self._tokenize_all(prompts)
        ids = []
        for prompt in tokenized:
            ids.append(str(self._counter))
            self._counter += 1
            engine.add_beam_request(ids[-1], prompt, params)
        results = []
        for out in self._run(ids, use_tqdm):
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

    def _tokenize_all(self, prompts: list) -> list[dict]:
        """Every prompt tokenized (once) and validated before any is queued; ValueError names the bad one."""
        engine = self.llm_engine
        tokenized = []
        for i, prompt in enumerate(prompts):
            try:
                text, token_ids = engine.tokenize_prompt(prompt)
                engine.validate_prompt(token_ids)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            tokenized.append({"prompt": text, "prompt_token_ids": token_ids})
        return tokenized

    def get_metrics(self):
        """vLLM-named metrics (objects with .name and .value)."""
        return self.llm_engine.get_metrics()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():  # as vLLM: also collects the async step past the last token
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]
