"""scripts/gpu_check.py, run on two logical CPU devices (what proves the script, not the GPUs)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


@pytest.mark.slow
def test_the_gpu_check_runs_every_offline_check_and_reports_its_figures(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--cpu_replicas=2", f"--out={tmp_path}", "--checks=overflow,compare,soak",
         "--soak_steps=60", "--steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert done.returncode == 0 and report["ok"], (done.stdout, json.dumps(checks, indent=1))
    for path in ("graph", "xla"):
        overflow = checks["overflow"][path]
        assert overflow["weights_finite"] and overflow["weights_equal_across_replicas"], overflow
        assert overflow["loss_scale"] == [overflow["initial_loss_scale"] / 2] * 2, overflow
    assert {row["status"] for row in checks["compare"]["modes"].values()} == {"done"}
    assert set(checks["compare"]["modes"]) == {"scratch", "frozen", "finetune", "staged", "lora"}
    soak = checks["soak"]
    assert soak["steps"] == 60 and soak["samples"] >= 4
    assert soak["threads"]["peak_last_third"] > 0 and soak["rss_mb"]["peak_last_third"] > 0
    results = json.loads((tmp_path / "soak" / "results.json").read_text())
    assert results["devices"]["replicas"] == 2 and results["devices"]["jit_compile"]
    assert results["global_step"] == 60


def test_an_unknown_check_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--checks=overflow,nope", f"--out={tmp_path}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--checks=overflow,nope: no check 'nope' (choose from "
                                                          "overflow, compare, soak, benchmark)")
    assert not os.listdir(tmp_path)
