"""Output processing (vLLM v1's `OutputProcessor`): sampled ids -> detokenized text, stop checks, RequestOutputs.

Per step it costs O(tokens that arrived): each token is detokenized incrementally and checked against the stop
conditions once; a `RequestOutput` is built only for the groups that progressed, and what it carries follows the
request's `output_kind` (vLLM's `RequestOutputKind`): CUMULATIVE copies everything so far, DELTA only what is new
since the group's previous output, FINAL_ONLY builds one output when the group finishes.
"""

import dataclasses
import itertools

import numpy as np

from jaxpaged.beam_search import BeamState
from jaxpaged.detokenizer import IncrementalDetokenizer, make_detokenizer
from jaxpaged.input_batch import ArrivedTokens
from jaxpaged.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from jaxpaged.prompt_logprobs import PromptChunk
from jaxpaged.request import Request, RequestStatus
from jaxpaged.sampler import SamplerOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.scheduler_output import SchedulerOutput


@dataclasses.dataclass(eq=False)
class RequestGroup:
    """A user request: `n` child sequences sharing one prompt (the first computes it; the others fork from it)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    sent_tokens: list[int] = dataclasses.field(default_factory=list)  # per child: tokens already in an output
    sent_chars: list[int] = dataclasses.field(default_factory=list)   # per child: text already in an output
    prompt_logprobs: PromptLogprobs | None = None  # filled as the prompt's chunks are computed
    sent_prompt_logprobs: bool = False
    beam: BeamState | None = None  # a beam search: its outputs come from BeamProcessor
    streams: bool = dataclasses.field(init=False)  # not FINAL_ONLY: an output in every step it progresses

    def __post_init__(self) -> None:
        self.streams = self.params.output_kind is not RequestOutputKind.FINAL_ONLY
        self.sent_tokens = [0] * len(self.children)
        self.sent_chars = [0] * len(self.children)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)

    def to_output(self, finished: bool) -> RequestOutput:
        """The group's output after a step, as its `output_kind` asks."""
        delta = self.params.output_kind is RequestOutputKind.DELTA
        outputs = [self._completion(i, delta) for i in range(len(self.children))]
        cached = max(self.children[0].num_cached_tokens, 0)
        prompt_logprobs = None if delta and self.sent_prompt_logprobs else self.prompt_logprobs  # DELTA: once
        self.sent_prompt_logprobs = True
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, prompt_logprobs, outputs, finished,
                             cached)

    def _completion(self, i: int, delta: bool) -> CompletionOutput:
        req, text = self.children[i], self.detokenizers[i].text
        tok0, char0 = (self.sent_tokens[i], self.sent_chars[i]) if delta else (0, 0)
        self.sent_tokens[i], self.sent_chars[i] = len(req.output_token_ids), len(text)
        want_logprobs = self.params.logprobs is not None
        return CompletionOutput(
            index=i, text=text[char0:], token_ids=req.output_token_ids[tok0:],
            cumulative_logprob=req.cumulative_logprob if want_logprobs else None,
            logprobs=req.logprobs[tok0:] if want_logprobs else None,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason)


class OutputProcessor:
    """Holds the live request groups; turns a finished step's sampled ids into outputs and finish decisions."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.groups: dict[str, RequestGroup] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            children: list[Request]) -> RequestGroup:
        detoks = [make_detokenizer(self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                                   stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
                  for _ in children]
        group = RequestGroup(request_id, prompt, prompt_token_ids, params, children, detoks)
        self.groups[request_id] = group
        for i, child in enumerate(children):
            child.group, child.index, child.detokenizer = group, i, detoks[i]
            child.cap_outputs(self.max_model_len)
        return group

    def process(self, sched: SchedulerOutput, outs: list[SamplerOutput], on_tokens, on_finish,
                prompt: tuple[list[PromptChunk], SamplerOutput | None] = ((), None)) -> list[RequestOutput]:
        """Takes a step's sampled ids (`outs`: one entry, or one per sub-step of a multi-step decode). Appends each
        live request's ids up to the first that meets a stop condition (its later ids are dropped), calls
        `on_tokens(ArrivedTokens)` once, then `on_finish(req, status)` for each request that stopped; returns
        one output per group that progressed (finished groups are dropped). Rows of requests that finished or were
        aborted while the step ran are ignored; beams are BeamProcessor's. `prompt`: the step's prompt-logprob
        chunks and their results.

        A request is handled once per step, its sub-steps' ids together: only stop strings and logprobs need a
        look at each token."""
        for chunk in prompt[0]:
            self._add_prompt_logprobs(chunk, prompt[1])
        ids = np.stack([out.token_ids for out in outs], axis=1)  # [S, K] sampled ids per row
        columns = ids.tolist()
        rows, reqs, steps = sched.sampling_plan()  # [P], P, [P]
        counts = steps.copy()  # [P] ids each request keeps
        skipped, finishing = [], []
        touched: dict[str, RequestGroup] = {}  # groups with an output to build: streaming or finishing ones
        running = RequestStatus.RUNNING
        # kept to plain operations (every row, every step): the common row's ids are appended right here
        for i, row, req, n in zip(itertools.count(), rows.tolist(), reqs, steps.tolist()):
            tokens = columns[row][:n]
            group = req.group
            if (req.status is running and req.plain and n < req.max_outputs - len(req.output_token_ids)
                    and req.stop_ids.isdisjoint(tokens) and group.beam is None):  # no stop is possible
                req.detokenizer.extend(tokens)
                req.output_token_ids += tokens  # Request.append_outputs, inlined
                req.num_pending -= n
                if group.streams:
                    touched[group.request_id] = group
            elif group.beam is not None or req.finished:
                skipped.append(i)
            else:
                status = self._accept(req, tokens, outs, row, req.max_outputs - len(req.output_token_ids))
                counts[i] = len(tokens)  # a stop cut them
                if status is not None:
                    finishing.append((req, status))
                if status is not None or group.streams:
                    touched[group.request_id] = group
        if skipped:
            kept = np.ones(len(reqs), bool)
            kept[skipped] = False
            reqs = [r for r, k in zip(reqs, kept.tolist()) if k]
            rows, counts = rows[kept], counts[kept]
        on_tokens(ArrivedTokens(reqs, rows, counts, ids))
        for req, status in finishing:
            on_finish(req, status)
        outputs = []
        for group in touched.values():
            finished = group.finished
            if finished or group.streams:
                outputs.append(group.to_output(finished))
            if finished:
                self.groups.pop(group.request_id, None)
        return outputs

    def _accept(self, req: Request, tokens: list[int], outs: list[SamplerOutput], row: int,
                room: int) -> RequestStatus | None:
        """Appends `tokens` (the request's ids of this step, in order) to its outputs and text up to the first one
        that meets a stop condition, which it returns (`tokens` is cut there); checked per token in vLLM's order:
        stop string, stop token id, EOS, max_tokens, max_model_len (`room`: outputs the length limits leave).
        `process` takes the common case itself: no stop strings or logprobs, no stop id, within the limits."""
        p = req.sampling_params
        detok = req.detokenizer
        per_token = bool(p.stop) or p.logprobs is not None
        status = None
        for j, token in enumerate(tokens):
            if p.logprobs is not None:
                self._add_logprobs(req, token, outs[j], row)
            stop_str = detok.append(token) if per_token else None
            status = self._stop_token_status(req, token, j + 1 >= room)
            if stop_str is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
            if status is not None:
                del tokens[j + 1:]
                break
        if not per_token:
            detok.extend(tokens)
        req.append_outputs(tokens)
        if status is not None:
            detok.finish()
        return status

    @staticmethod
    def _stop_token_status(req: Request, token: int, at_length_limit: bool) -> RequestStatus | None:
        """The status `token` ends the request with (stop strings aside; sets `stop_reason` for a stop token id),
        or None. `at_length_limit`: the token is the last max_tokens or max_model_len allows."""
        p = req.sampling_params
        if token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not p.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        return RequestStatus.FINISHED_LENGTH if at_length_limit else None

    def _add_logprobs(self, req: Request, token: int, out: SamplerOutput, row: int) -> None:
        req.cumulative_logprob += float(out.logprobs[row])
        req.logprobs.append(self.logprob_dict(token, out, row, req.sampling_params.logprobs))

    def _add_prompt_logprobs(self, chunk: PromptChunk, out: SamplerOutput) -> None:
        """Entries of prompt tokens start + 1 .. start + count not already there (a recomputed chunk adds none)."""
        group = chunk.request.group
        entries = group.prompt_logprobs if group is not None else None
        if entries is None or group.request_id not in self.groups:
            return
        k = group.params.prompt_logprobs
        for i in range(max(len(entries) - chunk.start - 1, 0), chunk.count):  # skip rows whose entries exist
            entries.append(self.logprob_dict(int(out.token_ids[chunk.row + i]), out, chunk.row + i, k))

    def logprob_dict(self, token: int, out: SamplerOutput, row: int, k: int) -> dict[int, Logprob]:
        """{token: its logprob and rank, then the top k} from row `row` of `out` (the token keeps its own rank)."""
        ids = [token] + out.top_ids[row, :k].tolist()
        lps = [float(out.logprobs[row])] + out.top_logprobs[row, :k].tolist()
        ranks = [int(out.ranks[row])] + list(range(1, k + 1))
        texts = self.tokenizer.convert_ids_to_tokens(ids) if self.tokenizer else [None] * len(ids)
        result = {}
        for tid, lp, rank, text in zip(ids, lps, ranks, texts):
            result.setdefault(tid, Logprob(lp, rank, text))
        return result
