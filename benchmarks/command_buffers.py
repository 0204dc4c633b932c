"""How often XLA re-records its GPU command buffers (CUDA graphs), from a log of `command_buffer_thunk`'s VLOG.

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 python3 step_profile.py ... --mark-steps 2> log
    python3 benchmarks/command_buffers.py log

A command buffer is recorded once and launched as one graph; when a buffer it references moved since the last
launch (a new input or output buffer each call, say), or one of its commands forces it, XLA records it again
("Updated command buffer in N us"): host time spent in the program's dispatch. Reports the command-buffer launches,
how many needed an update, the update microseconds, how many buffers had moved per launch and how many launches a
command forced to update (XLA's `force=1`, where the log says); per step too, over the steps `step_profile.py
--mark-steps` marked (the launches after a marker, up to the next). Prints one JSON line.
"""

import argparse
import collections
import re

from results import emit
from step_profile import STEP_MARKER

LAUNCH = re.compile(r"Execute command buffer(?! thunk)")  # not the profiler's fallback to thunks
UPDATED = re.compile(r"Updated command buffer in (\d+)")
MOVED = re.compile(r"updated(?:_allocs)?=(\d+)")
FORCED = re.compile(r"force=1")


def summarize(lines) -> dict:
    """Totals over the log's launches (an "Execute command buffer" line each: the update microseconds logged since
    the previous launch, the most buffers logged as moved, whether a command forced the update) and, where
    STEP_MARKER lines split it, the mean per marked step."""
    launches, steps = [], []  # steps: the launch count at each marker
    update, moved, forced = None, 0, False
    for line in lines:
        if STEP_MARKER in line:
            steps.append(len(launches))
        elif m := UPDATED.search(line):
            update = (update or 0) + int(m.group(1))
        elif m := MOVED.search(line):
            moved, forced = max(moved, int(m.group(1))), forced or bool(FORCED.search(line))
        elif LAUNCH.search(line):
            launches.append((update, moved, forced))
            update, moved, forced = None, 0, False
    record = {"part": "command_buffers", **_totals(launches)}
    if steps:  # the marked steps: from each marker to the next; the last one to its last launch of this kind
        marked = [launches[a:b] for a, b in zip(steps, steps[1:] + [len(launches)])]
        record["steps"] = len(marked)
        record["per_step"] = {k: sum(_totals(s)[k] for s in marked) / len(marked)
                              for k in ("launches", "updates", "update_us", "forced")}
    return record


def _totals(launches: list[tuple[int | None, int, bool]]) -> dict:
    spent = [u for u, _, _ in launches if u is not None]
    return {"launches": len(launches), "updates": len(spent), "update_us": sum(spent),
            "forced": sum(f for _, _, f in launches),
            "moved_per_launch": dict(sorted(collections.Counter(m for _, m, _ in launches).items()))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log")
    args = p.parse_args(argv)
    with open(args.log, errors="replace") as f:
        record = summarize(f)
    record["args"] = vars(args)
    emit(record, "command_buffers")
    return record


if __name__ == "__main__":
    main()
