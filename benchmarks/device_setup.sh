#!/usr/bin/env bash
# Kernel work on the GPU machine: makes `jaxpaged` importable (scripts/device_env.sh: editable install), else
# falls back to a package folder of symlinks on PYTHONPATH; installs the wheels of .whl/ (carried there: the
# server's packages, ../shared/tools/device-wheels) when they are missing. Use: source benchmarks/device_setup.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/device_env.sh"
if ! (cd /tmp && python3 -c "import jaxpaged.kernels" 2>/dev/null); then
  src=/tmp/jaxpaged_src
  rm -rf "$src" && mkdir -p "$src/jaxpaged"
  for f in "$root"/jaxpaged/*; do ln -s "$f" "$src/jaxpaged/"; done
  ln -s "$root/pallas_kernels" "$src/jaxpaged/kernels"
  ln -s "$root/models" "$src/jaxpaged/models"
  ln -s "$root/server" "$src/jaxpaged/server"
  export PYTHONPATH="$src:$root:${PYTHONPATH:-}"
fi
if [ -d "$root/.whl" ] && ! python3 -c "import fastapi, uvicorn, gguf" 2>/dev/null; then  # the server's packages
  python3 -m pip install -q --no-index --find-links "$root/.whl" fastapi uvicorn gguf >/dev/null 2>&1 ||
    echo "device_setup: installing the wheels in $root/.whl failed" >&2
fi
export PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import jaxpaged.kernels.gpu_split, jax; print('jaxpaged importable;', jax.devices())")
