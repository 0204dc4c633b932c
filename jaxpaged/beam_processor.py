"""The engine side of beam search: a step's candidates in, beams moved (pages shared, rows rewritten), outputs out.

A beam-search request is a group of beam_width sequences; the first computes the prompt and the others fork
from it (`Scheduler`), so every beam starts on the prompt's pages. Each step every live beam samples one row
whose top 2 x beam_width logprobs are its candidates (the sampled id itself is dropped: the request waits with
nothing to compute until the host chooses). When all live beams have offered, `BeamState.select` picks the next
beams; beam i then takes move i: its pages become those of the move's source (shared; the first write into a
shared partial page copies it) and its outputs the source's plus the move's token. Beams left without a move
are freed. Such steps run synchronously (`Request.host_sync`).

A beam preempted for pages restarts the whole request from its prompt (the beams must advance together);
the search is deterministic, so its result does not change.
"""

from jaxpaged.beam_search import BeamState, Hypothesis
from jaxpaged.output_processor import OutputProcessor, RequestGroup
from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.request import Request, RequestStatus
from jaxpaged.sampler import SamplerOutput
from jaxpaged.scheduler import Scheduler
from jaxpaged.scheduler_output import SchedulerOutput


class BeamProcessor:
    """Advances the live beam-search groups after each step."""

    def __init__(self, scheduler: Scheduler, runner, output_processor: OutputProcessor, max_model_len: int):
        self.scheduler = scheduler
        self.runner = runner
        self.output_processor = output_processor
        self.max_model_len = max_model_len
        self.groups: dict[str, RequestGroup] = {}  # request id -> live beam-search group
        self.num_restarts = 0

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group

    def discard(self, request_id: str) -> None:
        self.groups.pop(request_id, None)

    def process(self, sched: SchedulerOutput, out: SamplerOutput, on_finish) -> list[RequestOutput]:
        """Takes the beams' rows of a finished step; returns the outputs of the groups that finished.
        `on_finish(req, status)` ends a sequence (scheduler and runner)."""
        touched = {}
        rows, reqs, _ = sched.sampling_plan()
        for row, req in zip(rows.tolist(), reqs):  # beams take single steps
            group = req.group
            if group is None or group.beam is None or req.finished or group.request_id not in self.groups:
                continue
            req.num_pending -= 1
            width = 2 * group.beam.params.beam_width
            # the sampled id is the top one (greedy): the dict holds the top `width`, each with its rank
            top = self.output_processor.logprob_dict(int(out.token_ids[row]), out, row, width)
            group.beam.offer(req.index, [(token, top) for token in out.top_ids[row, :width].tolist()])
            touched[group.request_id] = group
        outputs = []
        for group in list(self.groups.values()):
            if any(c.status is RequestStatus.PREEMPTED for c in group.children):
                self._restart(group)
            elif group.request_id in touched and group.beam.ready:
                done = self._advance(group, on_finish)
                if done is not None:
                    outputs.append(done)
        return outputs

    def _advance(self, group: RequestGroup, on_finish) -> RequestOutput | None:
        state, beams = group.beam, group.children
        live = beams[:state.num_live]
        hyps = _hypotheses(live)
        moves = state.select(hyps)
        sources = [live[m.source] for m in moves]
        self.scheduler.pages.reassign(list(zip(beams, sources)))
        for req, move, src in zip(beams, moves, sources):
            h = hyps[move.source]
            req.output_token_ids = h.token_ids + [move.token]
            req.logprobs = h.logprobs + [move.logprobs]
            req.cumulative_logprob = move.cum_logprob
            req.num_computed_tokens = src.num_computed_tokens
            self.runner.rewrite_request(req)
        for req in live[len(moves):]:
            on_finish(req, RequestStatus.FINISHED_STOPPED)
        first = beams[0]
        if moves and len(first.output_token_ids) < state.params.max_tokens and first.num_tokens < self.max_model_len:
            return None
        return self._finish(group, on_finish)

    def _finish(self, group: RequestGroup, on_finish) -> RequestOutput:
        state = group.beam
        best = state.best(_hypotheses(group.children[:state.num_live]))
        outputs = [self._completion(i, h, state) for i, h in enumerate(best)]
        for req in group.children:
            if not req.finished:
                on_finish(req, RequestStatus.FINISHED_LENGTH)
        self.groups.pop(group.request_id, None)
        self.output_processor.groups.pop(group.request_id, None)
        cached = max(group.children[0].num_cached_tokens, 0)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, None, outputs, True, cached)

    def _completion(self, index: int, h: Hypothesis, state: BeamState) -> CompletionOutput:
        tok, text = self.output_processor.tokenizer, ""
        if tok is not None:
            eos = h.token_ids[-1:] if h.finish_reason == "stop" else []  # in token_ids; in the text only if asked
            text = tok.decode(h.token_ids[:len(h.token_ids) - len(eos)], skip_special_tokens=True)
            if state.params.include_stop_str_in_output:
                text += tok.decode(eos)
        return CompletionOutput(index=index, text=text, token_ids=h.token_ids, cumulative_logprob=h.cum_logprob,
                                logprobs=h.logprobs, finish_reason=h.finish_reason)

    def _restart(self, group: RequestGroup) -> None:
        """Back to the prompt: every beam freed, the first queued ahead of everything with the others to fork."""
        self.num_restarts += 1
        for req in group.children:
            self.scheduler.reset(req)
            self.runner.remove_request(req.request_id)
            req.output_token_ids, req.logprobs, req.cumulative_logprob = [], [], 0.0
        first = group.children[0]
        first.forks = group.children[1:]
        group.beam = BeamState(group.beam.params, group.beam.num_prompt_tokens, group.beam.eos_token_ids)
        self.scheduler.add_first(first)


def _hypotheses(beams: list[Request]) -> list[Hypothesis]:
    """The live beams' current outputs."""
    return [Hypothesis(r.output_token_ids, r.logprobs, r.cumulative_logprob) for r in beams]


def beam_children(request_id: str, prompt_token_ids: list[int], params, eos_token_ids) -> list[Request]:
    """The sequences of a beam-search request (see the module docstring)."""
    children = [Request(f"{request_id}-{i}", prompt_token_ids, params, eos_token_ids=eos_token_ids, host_sync=True)
                for i in range(params.n)]
    children[0].forks = children[1:]
    return children
