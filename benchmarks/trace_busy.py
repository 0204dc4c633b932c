"""Device busy time from a `jax.profiler.trace(..., create_perfetto_trace=True)` trace (Chrome trace JSON).

The trace's "traceEvents" hold metadata events ("ph": "M", "process_name" / "thread_name") and complete events
("ph": "X": "pid", "tid", "ts" and "dur" in microseconds). A GPU is a process named "/device:GPU:N"; its kernels
are on threads named "Stream #..." (xprof's derived lines, "XLA Modules" / "XLA Ops", span gaps between kernels and
are left out, as are memcpy / memset events). A CPU trace has no device process: XLA's CPU work is then taken,
heuristically, from the "tf_XLA..." worker threads, without their listener / wait markers.
"""

import collections
import glob
import gzip
import json
import os

_NOT_CPU_WORK = ("ThreadpoolListener", "end: ", "wait", "Await")
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Name Scope", "Steps", "Source")


def load_trace_events(trace_dir: str) -> list[dict]:
    """The events of the newest perfetto trace under `trace_dir` (perfetto_trace.json.gz, else *.trace.json.gz)."""
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
        paths = glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)
        if paths:
            with gzip.open(max(paths, key=os.path.getmtime)) as f:
                return json.load(f)["traceEvents"]
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz or *.trace.json.gz below it")


def union_length(intervals: list[tuple[float, float]], lo: float = float("-inf"), hi: float = float("inf")) -> float:
    """Total length covered by [start, end) intervals clipped to [lo, hi] (overlaps counted once)."""
    total, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


def _names(events: list[dict]) -> tuple[dict, dict]:
    """({pid: process name}, {(pid, tid): thread name}) from the metadata events."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    return procs, threads


def _gpu_kernels(spans: list[dict], procs: dict, threads: dict) -> list[dict]:
    """The kernel events of the GPU processes: those on "Stream..." threads, else on every thread but xprof's
    derived lines; memcpy / memset left out."""
    gpu = [e for e in spans if "/device:GPU" in procs.get(e["pid"], "")]
    streams = [e for e in gpu if _thread(e, threads).startswith("Stream")]
    if not streams:
        streams = [e for e in gpu if not any(d in _thread(e, threads) for d in _DERIVED_LINES)]
    return [e for e in streams if not e["name"].lower().startswith(("memcpy", "memset"))]


def _top_kernels(kernels: list[dict], lo: float, hi: float, top: int) -> dict[str, float]:
    totals = collections.Counter()
    for e in kernels:
        if lo <= e["ts"] < hi:
            totals[e["name"][:80]] += e["dur"]
    return {name: round(us, 1) for name, us in totals.most_common(top)}


def _thread(event: dict, threads: dict) -> str:
    return threads.get((event["pid"], event.get("tid")), "")


def _cpu_xla_work(spans: list[dict], threads: dict) -> list[dict]:
    return [e for e in spans if _thread(e, threads).startswith("tf_XLA")
            and not any(m in e["name"] for m in _NOT_CPU_WORK)]


def busy_summary(events: list[dict], window_event: str = "jaxpaged_step", top: int = 12) -> dict:
    """Busy time of the device over the window (from the first `window_event` span's start to the last one's end;
    the whole trace when there is none). Times in microseconds.

    Returns {"device": "gpu" or None, "window_us", "busy_us", "busy_fraction", "kernels", "kernel_threads",
    "top_kernels_us", "cpu_xla_busy_us", "cpu_xla_busy_fraction"}; the device fields are None without GPU kernel
    events, the cpu_xla ones without XLA CPU worker events. `top_kernels_us` maps the `top` kernel names with the
    most summed time in the window to that time.
    """
    procs, threads = _names(events)
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    marks = [e for e in spans if e["name"] == window_event] or spans
    lo = min(e["ts"] for e in marks)
    hi = max(e["ts"] + e["dur"] for e in marks)
    window = hi - lo
    out = {"device": None, "window_us": window, "busy_us": None, "busy_fraction": None, "kernels": 0,
           "kernel_threads": [], "top_kernels_us": {}}
    kernels = _gpu_kernels(spans, procs, threads)
    if kernels:
        busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in kernels], lo, hi)
        out.update(device="gpu", busy_us=busy, busy_fraction=busy / window, kernels=len(kernels),
                   kernel_threads=sorted({_thread(e, threads) for e in kernels}),
                   top_kernels_us=_top_kernels(kernels, lo, hi, top))
    cpu = _cpu_xla_work(spans, threads)
    cpu_busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in cpu], lo, hi) if cpu else None
    out.update(cpu_xla_busy_us=cpu_busy, cpu_xla_busy_fraction=None if cpu_busy is None else cpu_busy / window)
    return out
