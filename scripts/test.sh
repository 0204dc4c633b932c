#!/usr/bin/env bash
# Sets up .venv with the test dependencies and runs the default (CPU) test suite. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test || exit 1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests for: $*"
  exit 0
fi
exit $rc
