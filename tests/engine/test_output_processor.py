"""Output processing of a multi-step decode's ids: each request's ids taken together, cut at the first stop."""

import numpy as np

from jaxpaged.output_processor import OutputProcessor
from jaxpaged.request import Request, RequestStatus
from jaxpaged.sampler import SamplerOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.scheduler_output import SchedulerOutput

EOS = 2
PROMPT = [5, 6, 7]


def queued(proc, rid, num_pending, **params):
    """A running request of `proc` with `num_pending` ids on their way from the device."""
    p = SamplingParams(output_kind=RequestOutputKind.DELTA, **params)
    req = Request(rid, PROMPT, p, eos_token_ids=frozenset({EOS}))
    proc.add(rid, None, PROMPT, p, [req])
    req.status, req.num_pending = RequestStatus.RUNNING, num_pending
    return req


def sub_steps(ids):
    """One SamplerOutput per sub-step from [K, S] ids (no logprobs asked)."""
    ids = np.asarray(ids, np.int32)
    s = ids.shape[1]
    return [SamplerOutput(row, np.zeros(s, np.float32), np.ones(s, np.int32), np.zeros((s, 0), np.int32),
                          np.zeros((s, 0), np.float32)) for row in ids]


def finisher(finished):
    """`on_finish` as the engine's: records the request and ends it."""
    def finish(req, status):
        req.status = status
        finished.append((req.request_id, status))
    return finish


def kept(arrived):
    """The ids each request kept, as lists."""
    return [arrived.ids[row, :n].tolist() for row, n in zip(arrived.rows, arrived.counts)]


def test_ids_are_cut_at_the_first_stop_of_each_request_and_passed_on_once():
    proc = OutputProcessor(None, max_model_len=64)
    reqs = [queued(proc, "eos", 4), queued(proc, "stop-id", 4, stop_token_ids=[9]),
            queued(proc, "length", 4, max_tokens=3), queued(proc, "ignore", 4, ignore_eos=True),
            queued(proc, "runs", 4)]
    sched = SchedulerOutput.from_rows([(r, 3, 1, True, 4, 1) for r in reqs], num_steps=4)
    ids = np.array([[11, 12, 13, 14],    # eos: EOS third
                    [21, 9, 23, 24],     # stop-id: stop id second
                    [31, 32, 33, 34],    # length: max_tokens=3
                    [EOS, 42, EOS, 44],  # ignore: EOS ignored
                    [51, 52, 53, 54]]).T  # runs on
    ids[2, 0] = EOS
    passed, finished = [], []
    outputs = proc.process(sched, sub_steps(ids), lambda a: passed.append(a), finisher(finished))
    assert len(passed) == 1  # one persistent-batch update for the whole step
    assert kept(passed[0]) == [[11, 12, EOS], [21, 9], [31, 32, 33], [EOS, 42, EOS, 44], [51, 52, 53, 54]]
    assert passed[0].requests == reqs
    assert finished == [("eos", RequestStatus.FINISHED_STOPPED), ("stop-id", RequestStatus.FINISHED_STOPPED),
                        ("length", RequestStatus.FINISHED_LENGTH)]
    assert [r.num_pending for r in reqs] == [1, 2, 1, 0, 0]  # the dropped ids stay pending on finished requests
    by_id = {o.request_id: o for o in outputs}
    assert by_id["stop-id"].outputs[0].stop_reason == 9 and by_id["eos"].outputs[0].stop_reason is None
    assert [o.finished for o in outputs] == [True, True, True, False, False]
    assert set(proc.groups) == {"ignore", "runs"}


def test_max_model_len_cuts_like_max_tokens_and_finished_rows_are_skipped():
    proc = OutputProcessor(None, max_model_len=len(PROMPT) + 2)
    near, done = queued(proc, "near", 4), queued(proc, "done", 4)
    done.status = RequestStatus.FINISHED_ABORTED  # aborted while the step ran
    sched = SchedulerOutput.from_rows([(near, 3, 1, True, 4, 1), (done, 3, 1, True, 4, 1)], num_steps=4)
    passed, finished = [], []
    proc.process(sched, sub_steps(np.arange(8).reshape(4, 2) + 10), lambda a: passed.append(kept(a)),
                 finisher(finished))
    assert passed == [[[10, 12]]] and near.output_token_ids == [10, 12]
    assert finished == [("near", RequestStatus.FINISHED_LENGTH)] and done.output_token_ids == []
