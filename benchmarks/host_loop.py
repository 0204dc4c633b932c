"""The engine's host work per step without a device: scheduling, step layout and output processing of a steady
multi-step decode, timed on the CPU.

    python3 benchmarks/host_loop.py [--num-requests 256] [--num-scheduler-steps 8] [--repeats 5]

The real `Scheduler`, `PageManager` (prefix caching on), `InputBatch` and `OutputProcessor` (no tokenizer, as the
GPU benchmarks' dummy models) run the engine's loop with async scheduling: each step is scheduled, laid out, and the
previous step's sampled ids (random, drawn up front) are processed. No program runs, so what is timed is the
per-request Python the device step has to hide (issue 11's host-work target). Reported per decode step of
`--num-scheduler-steps` tokens (steps with prefills, and single steps of a multi-step run, are left out), the best
of `--repeats` runs of the whole workload: the figures of one machine are comparable with each other only.

It also reports the workload's schedule, which does not depend on the device (outputs are exactly their lengths):
steps by kind (single, multi-step decodes, multi-steps with prefills) and the sequence rows the multi-steps run,
padded to the engine's sequence buckets, times their sub-steps. `--dataset nano-vllm` runs nano-vllm's
ragged workload (512 requests, `--max-num-seqs` 256) instead of fixed lengths; `--multi-step-with-prefill` as in
`EngineArgs`.
"""

import argparse
import time

import numpy as np

from jaxpaged.buckets import Buckets
from jaxpaged.input_batch import InputBatch
from jaxpaged.output_processor import OutputProcessor
from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request
from jaxpaged.sampler import SamplerOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.scheduler import Scheduler
from results import emit
from workloads import BenchRequest, nano_vllm_requests, random_requests

PHASES = ("schedule", "layout", "process")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=None, help="default 256 (random), 512 (nano-vllm)")
    p.add_argument("--input-len", type=int, default=562)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--dataset", choices=("random", "nano-vllm"), default="random")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: every request (random), 256 (nano-vllm)")
    p.add_argument("--num-scheduler-steps", type=int, default=8)
    p.add_argument("--multi-step-with-prefill", action="store_true")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _sampled(num_steps: int, num_rows: int, rng) -> list[SamplerOutput]:
    ids = rng.integers(0, 1000, (num_steps, num_rows)).astype(np.int32)
    return [SamplerOutput(ids[j]) for j in range(num_steps)]  # as a step without logprobs gives them


def workload(args) -> list[BenchRequest]:
    if args.dataset == "nano-vllm":
        return nano_vllm_requests(args.num_requests or 512, vocab_size=32000)
    return random_requests(args.num_requests or 256, args.input_len, args.output_len, 0.0, vocab_size=32000)


def max_num_seqs(args) -> int:
    """The sequence limit: `--max-num-seqs`, else every request (random) or 256 (nano-vllm, as in RESULTS.md)."""
    if args.max_num_seqs:
        return args.max_num_seqs
    return 256 if args.dataset == "nano-vllm" else args.num_requests or 256


def run_once(args) -> tuple[dict[str, float], int, dict[str, int]]:
    """Seconds per phase summed over the workload's decode steps of `num_scheduler_steps`, how many there were,
    and the schedule's counts."""
    requests = workload(args)
    n = max_num_seqs(args)
    max_len = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    pages = PageManager(n * -(-max_len // args.page_size) + 1, args.page_size, True)
    scheduler = Scheduler(pages, n, args.max_num_batched_tokens, max_len, args.num_scheduler_steps,
                          multi_step_with_prefill=args.multi_step_with_prefill)
    batch = InputBatch(n, max_len, args.page_size)
    buckets = Buckets(args.max_num_batched_tokens, n)
    outputs = OutputProcessor(None, max_len)
    rng = np.random.default_rng(0)
    for i, r in enumerate(requests):
        params = SamplingParams(max_tokens=r.output_len, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
        req = Request(str(i), r.prompt_token_ids, params)
        outputs.add(req.request_id, None, req.prompt_token_ids, params, [req])
        scheduler.add_request(req)

    def finish(req, status):
        scheduler.finish(req, status)
        batch.remove(req.request_id)

    seconds, decode_steps, in_flight = dict.fromkeys(PHASES, 0.0), 0, None
    schedule = dict.fromkeys(("single_steps", "multi_steps", "multi_steps_with_prefill", "multi_step_rows"), 0)
    while scheduler.num_unfinished or in_flight:
        t0 = time.perf_counter()
        sched = scheduler.schedule()
        t1 = time.perf_counter()
        slots = batch.slots(sched.requests)
        for i in np.flatnonzero(slots < 0).tolist():
            slots[i] = batch.add(sched.requests[i])
        batch.page_updates(sched, slots, pages.pages_of)
        rows = n if sched.num_steps > 1 and not sched.with_prefill else args.max_num_batched_tokens
        batch.layout(sched, slots, rows, n)
        t2 = time.perf_counter()
        if in_flight is not None:
            outputs.process(*in_flight, batch.append_tokens, finish)
        t3 = time.perf_counter()
        in_flight = (sched, _sampled(sched.num_steps + sched.with_prefill, n, rng)) if sched.requests else None
        if sched.requests:
            multi = sched.num_steps > 1
            schedule["multi_steps_with_prefill" if sched.with_prefill else "multi_steps" if multi
                     else "single_steps"] += 1
            schedule["multi_step_rows"] += multi * sched.num_steps * buckets.num_seqs(len(sched.requests))
        if sched.num_steps == args.num_scheduler_steps and sched.requests and sched.num_tokens == len(sched.requests):
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[phase] += dt
            decode_steps += 1
    return seconds, decode_steps, schedule


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = [run_once(args) for _ in range(args.repeats)]
    steps = runs[0][1]
    best = {p: min(r[0][p] for r in runs) * 1e3 / max(steps, 1) for p in PHASES}
    record = {"part": "host_loop", "decode_steps": steps, "schedule": runs[0][2], "ms_per_decode_step": best,
              "host_ms_per_decode_step": sum(best.values()), "us_per_request_and_step":
              sum(best.values()) * 1e3 / max_num_seqs(args), "args": vars(args)}
    emit(record, "host_loop")
    return record


if __name__ == "__main__":
    main()
