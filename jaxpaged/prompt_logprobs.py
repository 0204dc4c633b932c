"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): the token rows of a step that score prompt tokens.

The logits of prompt position p score prompt token p + 1, so a chunk [start, start + count) of a request's prompt
yields the entries of tokens start + 1 .. start + count (the last prompt position scores the first output, which
the sampler handles). Requests that ask for prompt logprobs skip the prefix cache (as vLLM), so every position is
computed; a preempted request recomputes positions whose entries exist, and those are not added twice.
"""

import dataclasses

import numpy as np

from jaxpaged.request import Request
from jaxpaged.scheduler_output import SchedulerOutput


@dataclasses.dataclass(frozen=True, slots=True)
class PromptChunk:
    """Rows [row, row + count) of a step score prompt tokens start + 1 .. start + count of `request`."""

    request: Request
    row: int
    start: int
    count: int


def prompt_chunks(sched: SchedulerOutput, cu_q_lens: np.ndarray) -> list[PromptChunk]:
    """The chunks of a step's rows (`cu_q_lens` [S + 1] of its layout) whose requests ask for prompt logprobs."""
    chunks = []
    for i, (req, start, count) in enumerate(zip(sched.requests, sched.starts.tolist(), sched.counts.tolist())):
        if req.sampling_params.prompt_logprobs is None:
            continue
        stop = min(start + count, req.num_prompt_tokens - 1)
        if stop > start:
            chunks.append(PromptChunk(req, int(cu_q_lens[i]), start, stop - start))
    return chunks


def prompt_targets(chunks: list[PromptChunk], num_tokens: int) -> np.ndarray:
    """[num_tokens] int32: the prompt token each chunk row scores (0 elsewhere)."""
    targets = np.zeros(num_tokens, np.int32)
    for c in chunks:
        targets[c.row:c.row + c.count] = c.request.prompt_token_ids[c.start + 1:c.start + 1 + c.count]
    return targets
