"""How often XLA re-records its GPU command buffers (CUDA graphs), from a log of `command_buffer_thunk`'s VLOG.

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 python3 step_profile.py ... 2> log
    python3 benchmarks/command_buffers.py log [--last N]

A command buffer is recorded once and launched as one graph; when a buffer it references moved since the last
launch (a new input or output buffer each call, say), XLA records it again ("Updated command buffer in N us"),
and that is host time spent in the program's dispatch. Reports, over the last `--last` command-buffer launches of
the log (default: all), the launches, how many needed an update, the update microseconds, how many buffers had
moved per launch and how many launches a command forced to update with none moved (XLA's `force=1`, where the log
says). Prints one JSON line.
"""

import argparse
import collections
import re

from results import emit

LAUNCH = re.compile(r"Execute command buffer(?! thunk)")  # not the profiler's fallback to thunks
UPDATED = re.compile(r"Updated command buffer in (\d+)")
MOVED = re.compile(r"updated(?:_allocs)?=(\d+)")
FORCED = re.compile(r"force=1")


def summarize(lines, last: int | None = None) -> dict:
    """Per launch (an "Execute command buffer" line): the update microseconds logged since the previous launch
    (None: no update), the most buffers logged as moved, and whether a command forced the update."""
    launches = []
    update, moved, forced = None, 0, False
    for line in lines:
        if m := UPDATED.search(line):
            update = (update or 0) + int(m.group(1))
        elif m := MOVED.search(line):
            moved, forced = max(moved, int(m.group(1))), forced or bool(FORCED.search(line))
        elif LAUNCH.search(line):
            launches.append((update, moved, forced))
            update, moved, forced = None, 0, False
    launches = launches[-last:] if last else launches
    spent = [u for u, _, _ in launches if u is not None]
    return {"part": "command_buffers", "launches": len(launches), "updates": len(spent),
            "update_us": sum(spent), "forced": sum(f for _, _, f in launches),
            "moved_per_launch": dict(sorted(collections.Counter(m for _, m, _ in launches).items()))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log")
    p.add_argument("--last", type=int, default=None)
    args = p.parse_args(argv)
    with open(args.log, errors="replace") as f:
        record = summarize(f, args.last)
    record["args"] = vars(args)
    emit(record, "command_buffers")
    return record


if __name__ == "__main__":
    main()
