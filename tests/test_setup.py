"""What setup.py installs: none of the project's flat modules, whose generic names (model, tools, tokenizer,
train, generate, serve, ...) in site-packages would answer another project's `import model`. Builds the wheel
pip would install from these files and lists it (without the CUDA kernel: building it is not the question)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_wheel_installs_no_generic_top_level_module(tmp_path):
    pytest.importorskip("setuptools")  # --no-build-isolation builds with this environment's setuptools
    src, dist = tmp_path / "src", tmp_path / "dist"
    src.mkdir()
    modules = sorted(f.stem for f in ROOT.glob("*.py") if f.name != "setup.py")
    for f in ROOT.glob("*.py"):  # setup.py and every module it could install (not demo/ or runs/)
        shutil.copy(f, src)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
           "-w", str(dist)]
    r = subprocess.run(cmd, cwd=src, env={**os.environ, "KIMI_BUILD_CUDA": "0"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    top = set()  # the names that land in site-packages: the wheel's top level, its .data/purelib and platlib
    for name in zipfile.ZipFile(wheel).namelist():
        parts = name.split("/")
        if parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
            parts = parts[2:]
        if not parts[0].endswith((".dist-info", ".data")):
            top.add(parts[0])
    assert {"model", "tools", "tokenizer", "train", "generate", "serve"} <= set(modules)  # what this guards
    installed = {t.removesuffix(".py") for t in top} & set(modules)
    assert not installed, f"installed as top-level modules: {sorted(installed)}"
    assert all(t.startswith("kimi_k2") for t in top), f"a top-level name not the project's own: {sorted(top)}"
