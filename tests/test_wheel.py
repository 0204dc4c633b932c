"""`pip install .` builds a real wheel (not the editable install of .venv): its console script, its kernels and
server packages and its shipped configs work from a fresh venv's site-packages."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A shipped config with tiny overrides: load_model reads the shipped json, the weights take milliseconds.
CHECK = """
import json
import jaxpaged, jaxpaged.kernels, jaxpaged.server
from jaxpaged.models import SHIPPED_CONFIGS, load_model
from jaxpaged.models.loader import shipped_config

tiny = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 256}
cfg = load_model("llama-3.2-1b", load_format="dummy", hf_config_overrides=tiny).config
print(json.dumps({
    "files": [jaxpaged.__file__, jaxpaged.kernels.__file__, jaxpaged.server.__file__],
    "kernel": callable(jaxpaged.kernels.ragged_paged_attention),
    "layers": {name: shipped_config(name)["num_hidden_layers"] for name in SHIPPED_CONFIGS},
    "loaded": [cfg.hidden_size, cfg.rope_theta, cfg.max_position_embeddings],
}))
"""


def _run(cmd: list, cwd: Path) -> str:
    # NOTE: never the checkout as cwd: `python -c` puts cwd first on sys.path, and ./jaxpaged would shadow the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _copy_sources(dst: Path) -> None:
    """The files a wheel is built from: building in the checkout would leave build/ there (whose stale build/lib
    can ship modules deleted since)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in set(package_dirs.values()):
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(venv, its site-packages) with the wheel installed, --no-deps; the dependencies come from this venv's
    site-packages through a .pth line, which (unlike a site dir) does not run the editable install's finder."""
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_sources(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", tmp / "src"],
         tmp)
    (wheel,) = (tmp / "dist").glob("jaxpaged-*.whl")
    venv = tmp / "venv"
    _run([sys._base_executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).strip())
    (site / "jaxpaged_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], tmp)
    return venv, site


def test_wheel_console_script_prints_help(wheel_venv):
    venv, _ = wheel_venv
    out = _run([venv / "bin" / "jaxpaged", "--help"], venv)
    assert out.startswith("usage: jaxpaged") and "generate" in out and "serve" in out


def test_wheel_imports_from_site_packages_and_loads_shipped_configs(wheel_venv):
    venv, site = wheel_venv
    got = json.loads(_run([venv / "bin" / "python", "-c", CHECK], venv).splitlines()[-1])
    assert [Path(f).relative_to(site).as_posix() for f in got["files"]] == [
        "jaxpaged/__init__.py", "jaxpaged/kernels/__init__.py", "jaxpaged/server/__init__.py"]
    assert got["kernel"]
    assert got["layers"] == {"llama-3.2-1b": 16, "llama-3.1-8b": 32, "llama-3.1-70b": 80}
    assert got["loaded"] == [64, 500000.0, 131072]
