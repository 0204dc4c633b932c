"""Where a jaxpaged step's time goes: host ms per `LLMEngine.step` and the device's busy fraction, from a profile.

    python benchmarks/step_profile.py [--num-prompts 256 --input-len 512 --output-len 128] \
        [--warmup-steps 32 --profile-steps 64] [--trace-dir DIR] [--python-tracer]   # + throughput.py's engine flags

A decode-heavy workload (default 256 requests x 512 prompt tokens x 128 output tokens, dummy bf16 Llama-3.2-1B)
is queued at once; after --warmup-steps steps (the prefills, by default) the next --profile-steps steps run under
`jax.profiler.trace(DIR, create_perfetto_trace=True)`, each inside a "jaxpaged_step" trace annotation and timed
with perf_counter; the time each step waits in `StepHandle.result()` for the device is timed too, and the rest of
the step is its host work (issue 11's "host work per step"; blocking transfers or dispatches included). XLA turns
its GPU command buffers (CUDA graphs) off while the profiler runs (`xla_enable_command_buffers_during_profiling`),
so each kernel is then launched on its own and dispatch costs more: the same timings are therefore first taken
over --profile-steps steps without the profiler ("untraced", with each compiled program's dispatch timed); the
host work per step is reported from both. The device busy fraction is the union of GPU kernel intervals over the
traced window (trace_busy.py); on a CPU there is no device stream and it is null (`cpu_xla_busy_fraction` then
estimates XLA's CPU work). --host-profile-steps N runs N more steps under cProfile afterwards and reports the
functions with the most self time per step. --timeline instead runs the whole queued workload untraced (no
warm-up steps) through `LLM.generate`, as throughput.py times it, and reports each step: what it launched (tokens,
rows, sub-steps), its ms and the ms it waited for the device; with sums per kind of step and the host time before
the first step and after the last, to show where an offline run's wall time goes. Prints one JSON line (also
appended to $OUT/step_profile.jsonl when $OUT is set).
"""

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time

from results import emit
from throughput import (add_engine_args, add_workload_args, build_requests, engine_kwargs, finish_args,
                        log_engine_info, model_config, sampling_params)
from trace_busy import busy_summary, load_trace_events

STEP_MARKER = "step_profile: untraced step"


def parse_args(argv=None) -> argparse.Namespace:
    p = add_workload_args(add_engine_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    p.set_defaults(input_len=512, output_len=128)
    p.add_argument("--warmup-steps", type=int, default=32, help="steps run before the profiled window")
    p.add_argument("--profile-steps", type=int, default=64)
    p.add_argument("--trace-dir", default=None, help="default: /tmp/jaxpaged_step_trace")
    p.add_argument("--python-tracer", action="store_true", help="also trace Python calls (a far larger trace)")
    p.add_argument("--host-profile-steps", type=int, default=0,
                   help="then run this many more steps under cProfile and report the functions with most self time")
    p.add_argument("--timeline", action="store_true", help="the whole workload untraced, step by step (no trace)")
    p.add_argument("--mark-steps", action="store_true",
                   help=f"write '{STEP_MARKER}' to stderr before each untraced step (benchmarks/command_buffers.py "
                        "splits XLA's log there)")
    return finish_args(p.parse_args(argv))


@contextlib.contextmanager
def timed_waits(waits: list[float]):
    """Appends the seconds of every `StepHandle.result()` (the host waiting for a step's sampled ids) to
    `waits` while the block runs."""
    from jaxpaged.runner import StepHandle

    result = StepHandle.result

    def timed(handle):
        t = time.perf_counter()
        try:
            return result(handle)
        finally:
            waits.append(time.perf_counter() - t)

    StepHandle.result = timed
    try:
        yield
    finally:
        StepHandle.result = result


class _TimedProgram:
    """A compiled step program that appends the seconds of each call (its dispatch: the call returns before the
    device is done) to `seconds`."""

    def __init__(self, program, seconds: list[float]):
        self.program, self.seconds = program, seconds

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.program(*args)
        finally:
            self.seconds.append(time.perf_counter() - t)


@contextlib.contextmanager
def timed_dispatches(runner, seconds: dict[str, list[float]]):
    """While the block runs, every call of the runner's compiled programs is timed: `seconds[kind]` ("forward",
    "sample", "decode", "update", ...) collects the seconds of each call."""
    originals = dict(runner.executables)
    runner.executables.update({key: _TimedProgram(program, seconds.setdefault(key[0], []))
                               for key, program in originals.items()})
    try:
        yield
    finally:
        runner.executables.update(originals)


def timed_steps(engine, num_steps: int, launched: list | None = None,
                mark: bool = False) -> tuple[list[float], list[float], float]:
    """Runs up to `num_steps` engine steps, each inside a "jaxpaged_step" trace annotation; returns each step's
    seconds, the seconds of each step spent waiting for the device, and the window's. `launched`, if given,
    collects the SchedulerOutput each step launched (None for a step that launched nothing); `mark` writes
    STEP_MARKER to stderr before each step."""
    times, waits = [], []
    start = time.perf_counter()
    while len(times) < num_steps and engine.has_unfinished_requests():
        if mark:
            print(STEP_MARKER, file=sys.stderr, flush=True)
        _timed_step(engine, engine.step, times, waits, launched)
    return times, waits, time.perf_counter() - start


def _timed_step(engine, step, times: list[float], waits: list[float], launched: list | None):
    """Runs `step` (the engine's) inside a "jaxpaged_step" trace annotation; appends its seconds to `times`, the
    seconds it waited for the device to `waits` and, if given, what it launched to `launched`; returns its
    outputs."""
    import jax

    step_waits = []
    with jax.profiler.TraceAnnotation("jaxpaged_step"), timed_waits(step_waits):
        t = time.perf_counter()
        outputs = step()
        times.append(time.perf_counter() - t)
    waits.append(sum(step_waits))
    if launched is not None:
        launched.append(engine._in_flight.sched if engine._in_flight is not None else None)
    return outputs


def profiled_steps(engine, num_steps: int, trace_dir: str,
                   python_tracer: bool) -> tuple[list[float], list[float], float]:
    """`timed_steps` under the profiler. Without `python_tracer` the trace holds no Python function events (they
    would dwarf the rest)."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = int(python_tracer)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
        return timed_steps(engine, num_steps)


def host_profile(engine, num_steps: int, top: int = 25) -> dict:
    """Up to `num_steps` more engine steps under cProfile: the `top` functions by self time, in ms (and calls) per
    step (cProfile's own overhead included)."""
    prof, steps = cProfile.Profile(), 0
    while steps < num_steps and engine.has_unfinished_requests():
        prof.enable()
        engine.step()
        prof.disable()
        steps += 1
    if not steps:
        return {}
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {f"{os.path.basename(path)}:{line}({name})": {"self_ms": 1000 * tt / steps, "cum_ms": 1000 * ct / steps,
                                                           "calls": nc / steps}
            for (path, line, name), (_, nc, tt, ct, _) in rows}


def timeline(llm, prompts: list, params: list) -> dict:
    """`llm.generate(prompts, params)` untraced, step by step: per step [tokens, rows, sub-steps, ms, wait ms] of
    the step it launched (with async scheduling a step waits for the one before), sums per kind ("prefill": a
    step with prompt tokens; "decode": one token per row; "multi": a multi-step decode), and the host time around
    the steps: `queue_s` from the call to its first step (validating the prompts, queueing the first step's
    requests), `tail_s` from the end of its last step to its return."""
    engine = llm.llm_engine
    times, waits, launched, starts = [], [], [], []
    step = engine.step

    def timed():
        starts.append(time.perf_counter())
        return _timed_step(engine, step, times, waits, launched)

    engine.step = timed  # the instance's, while generate runs
    try:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        end = time.perf_counter()
    finally:
        del engine.step
    rows, kinds = [], {}
    for seconds, wait, sched in zip(times, waits, launched):
        ms, wait_ms = 1000 * seconds, 1000 * wait
        tokens, seqs = (sched.num_tokens, len(sched.requests)) if sched else (0, 0)
        sub_steps = sched.num_steps if sched else 0
        kind = "none" if sched is None else "prefill" if tokens > seqs else "multi" if sub_steps > 1 else "decode"
        total = kinds.setdefault(kind, {"steps": 0, "ms": 0.0, "wait_ms": 0.0})
        total["steps"] += 1
        total["ms"] += ms
        total["wait_ms"] += wait_ms
        rows.append([tokens, seqs, sub_steps, round(ms, 2), round(wait_ms, 2)])
    return {"part": "timeline", "generate_s": end - start, "queue_s": starts[0] - start,
            "steps_s": sum(times), "tail_s": end - starts[-1] - times[-1], "steps": len(rows),
            "host_work_s": sum(times) - sum(waits), "wait_s": sum(waits),
            "by_kind": kinds, "step_rows": rows}


def _mean_p50(seconds: list[float]) -> dict:
    return {"mean": 1000 * statistics.fmean(seconds), "p50": 1000 * statistics.median(seconds)}


def _window(times: list[float], waits: list[float], wall: float, dispatches: dict[str, list[float]]) -> dict:
    """Step, host-work, wait and per-program dispatch ms of an untraced window."""
    steps = max(len(times), 1)
    return {"steps": len(times), "wall_s": wall, "host_ms_per_step": _mean_p50(times),
            "host_work_ms_per_step": _mean_p50([t - w for t, w in zip(times, waits)]),
            "wait_ms_per_step": _mean_p50(waits), "step_ms": [round(1000 * t, 2) for t in times],
            "dispatch_ms_per_step": {k: 1000 * sum(v) / steps for k, v in dispatches.items() if v},
            "dispatch_calls_per_step": {k: len(v) / steps for k, v in dispatches.items() if v}}


def main() -> None:
    from jaxpaged import LLM
    from jaxpaged.sampling_params import RequestOutputKind

    args = parse_args()
    log_engine_info()
    trace_dir = args.trace_dir or "/tmp/jaxpaged_step_trace"
    requests = build_requests(args, model_config(args.model).vocab_size)
    params = sampling_params(requests)
    llm = LLM(args.model, **engine_kwargs(args, requests))
    llm.llm_engine.warm_up()
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm the host path
    engine = llm.llm_engine
    if args.timeline:
        emit({**timeline(llm, prompts, params), "args": vars(args)}, "step_profile")
        return
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        p.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: one output per request, at its end
        engine.add_request(f"profile-{i}", prompt, p)
    for _ in range(args.warmup_steps):
        engine.step()
    dispatches: dict[str, list[float]] = {}
    with timed_dispatches(engine.runner, dispatches):
        untraced = timed_steps(engine, args.profile_steps, mark=args.mark_steps)
    times, waits, wall = profiled_steps(engine, args.profile_steps, trace_dir, args.python_tracer)
    if not times:
        raise SystemExit(f"all requests finished within --warmup-steps {args.warmup_steps} and --profile-steps "
                         f"{args.profile_steps} untraced ones: nothing to profile")
    host = host_profile(engine, args.host_profile_steps) if args.host_profile_steps else None
    busy = busy_summary(load_trace_events(trace_dir))
    device_ms = None if busy["busy_us"] is None else busy["busy_us"] / 1000 / len(times)
    emit({"untraced": _window(*untraced, dispatches), "steps": len(times), "wall_s": wall,
          "host_ms_per_step": _mean_p50(times),
          "host_work_ms_per_step": _mean_p50([t - w for t, w in zip(times, waits)]),
          "wait_ms_per_step": _mean_p50(waits),
          "step_ms": [round(1000 * t, 2) for t in times],
          "device_busy_fraction": busy["busy_fraction"], "device_ms_per_step": device_ms,
          "device": busy["device"] or "none: no device stream in the trace",
          "trace_window_ms": busy["window_us"] / 1000, "kernels": busy["kernels"],
          "top_kernels_ms": {k: us / 1000 for k, us in busy["top_kernels_us"].items()},
          "kernel_threads": busy["kernel_threads"], "cpu_xla_busy_fraction": busy["cpu_xla_busy_fraction"],
          "host_profile": host, "trace_dir": os.path.abspath(trace_dir), "args": vars(args)}, "step_profile")


if __name__ == "__main__":
    main()
