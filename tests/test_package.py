"""The package as pip builds it: the wheel holds every module and shipped file under one name,
transfer_engine, and installed in a fresh virtualenv its console command runs README's main job from a
directory outside the checkout."""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT


NOT_SHIPPED = ("tests", "scripts", "examples", "docs", "build", "dist")  # Folders of the checkout, not the package.


def source_modules():
    """The package's Python modules in the checkout, as paths below it: those at its top and in every
    folder of modules below (a new sub-package included), but not the checkout's own folders."""
    found = set()
    for folder, folders, files in os.walk(ROOT):
        relative = os.path.relpath(folder, ROOT)
        folders[:] = [name for name in folders if not name.startswith((".", "__")) and not name.endswith(".egg-info")
                      and (relative != "." or name not in NOT_SHIPPED)]
        found |= {os.path.normpath(os.path.join(relative, name)) for name in files if name.endswith(".py")}
    return found


def _built_wheel(folder):
    """pip's wheel of a copy of the checkout (a build writes build/ and *.egg-info into its source tree)."""
    source = os.path.join(folder, "source")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info",
                                                                "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(folder), source], check=True, capture_output=True, timeout=600)  # The installed setuptools.
    wheels = glob.glob(os.path.join(folder, "transfer_engine-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _virtualenv_seeing_these_packages(venv):
    """A fresh virtualenv whose interpreter also sees the packages this one has installed (TensorFlow and
    the rest, not downloaded again), behind its own: a .pth file lists this interpreter's site-packages
    (`--system-site-packages` would show the base interpreter's, not those of a virtualenv the tests run
    in). The .pth files of those folders are not read, so an editable install of this checkout is not
    seen: the wheel is."""
    import site

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    [own] = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    with open(os.path.join(own, "_these_packages.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return venv


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_virtualenv_and_runs_the_main_job_from_anywhere(tmp_path):
    wheel = _built_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"transfer_engine", "transfer_engine-0.1.0.dist-info"}
    modules = {name.removeprefix("transfer_engine/") for name in names if name.endswith(".py")}
    assert modules == source_modules(), "setup.cfg's packages miss (or add) a module of the checkout"
    for shipped in ("configs/frozen.flags", "configs/compare.flags", "configs/cats_vs_dogs/frozen.flags",
                    "models/pretrained/mobilenet_v2_0.35_96_fmnist7.weights.h5",
                    "data/fashion_mnist_sample/train-images-idx3-ubyte.gz"):
        assert f"transfer_engine/{shipped}" in names, shipped

    venv = _virtualenv_seeing_these_packages(tmp_path / "venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index"]
    # The wheel itself, over the editable checkout the test runs from; then what it declares, found installed.
    install = subprocess.run([*pip, "--no-deps", "--force-reinstall", wheel], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    install = subprocess.run([*pip, f"{wheel}[cpu]"], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{venv / 'bin'}:{env['PATH']}")
    done = subprocess.run(["transfer-engine", "--flagfile=configs/frozen.flags"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "INFO Done: test accuracy " in done.stderr.strip().splitlines()[-1]
    results = json.loads((elsewhere / "runs" / "frozen" / "results.json").read_text())
    assert results["test_examples"] == 3000 and results["test_accuracy"] > 0.6
    flags = (elsewhere / "runs" / "frozen" / "flags.txt").read_text()
    assert f"--weights={venv}/lib/" in flags  # The shipped weights, found from outside the checkout.
    # Installing it adds no generic top-level names another project could be shadowed by.
    generic = subprocess.run([str(venv / "bin" / "python"), "-c", "import data"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=120)
    assert "No module named 'data'" in generic.stderr
    bad = subprocess.run(["transfer-engine", "--flagfile=configs/frozen.flags", "--epochs=0"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=600)
    assert (bad.returncode, bad.stderr.strip().splitlines()[-1]) == (2, "error: --epochs=0: must be positive")
