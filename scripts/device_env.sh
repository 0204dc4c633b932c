#!/usr/bin/env bash
# Makes the working tree importable as `jaxpaged` on a machine without network (the GPU machine): tries an
# editable install, else builds a package folder of symlinks under /tmp/jaxpaged_src and puts it on PYTHONPATH.
# Use: source scripts/device_env.sh (then run scripts by path, or python -c from outside the repo root)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! (cd /tmp && python3 -c "import jaxpaged.kernels" 2>/dev/null); then
  src=/tmp/jaxpaged_src
  rm -rf "$src" && mkdir -p "$src/jaxpaged"
  for f in "$root"/jaxpaged/*; do ln -s "$f" "$src/jaxpaged/"; done
  ln -s "$root/pallas_kernels" "$src/jaxpaged/kernels"
  ln -s "$root/models" "$src/jaxpaged/models"
  ln -s "$root/server" "$src/jaxpaged/server"
  export PYTHONPATH="$src:$root:${PYTHONPATH:-}"
fi
