"""Benchmark output: one JSON line per measurement, printed the moment it is measured and, when $OUT is set (the
device machine), appended to $OUT/<name>.jsonl, so a step that overruns its time limit loses only itself."""

import json
import math
import os


def _strict(value):
    """`value` with non-finite floats as strings ("inf"), so that every line is strict JSON (jq reads it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def emit(record: dict, name: str) -> None:
    """Prints `record` as one JSON line (flushed) and appends it to $OUT/<name>.jsonl if $OUT is set."""
    line = json.dumps(_strict(record), default=str)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"{name}.jsonl"), "a") as f:
            f.write(line + "\n")
