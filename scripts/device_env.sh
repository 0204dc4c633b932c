#!/usr/bin/env bash
# Makes the working tree importable as `jaxpaged` on the GPU machine (no network): an editable install without
# build isolation or dependencies, which maps jaxpaged.kernels/models/server onto their folders.
# Use: source scripts/device_env.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! (cd /tmp && python3 -c "import jaxpaged.kernels" 2>/dev/null); then
  python3 -m pip install -q --no-build-isolation --no-deps -e "$root" >/dev/null 2>&1 ||
    echo "device_env: editable install of $root failed" >&2
fi
