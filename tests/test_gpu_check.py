"""scripts/gpu_check.py, run on two logical CPU devices (what proves the script, not the GPUs)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _gpu_check(out, *args):
    """scripts/gpu_check.py on two logical CPU devices; returns its report after checking it passed."""
    done = subprocess.run([sys.executable, SCRIPT, "--cpu_replicas=2", f"--out={out}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0 and report["ok"], (done.stdout, json.dumps(report["checks"], indent=1))
    return report["checks"]


@pytest.mark.longest
@pytest.mark.slow
def test_the_gpu_check_runs_every_offline_check_and_reports_its_figures(pretrained_run, tmp_path):
    # Twice, with the fewest steps and images that still run each path (flags after `--` go to every
    # launch.py run): the compare on small_cnn (five modes' tracing is what MobileNetV2 would add), the soak
    # as written, whose thirds must be steps to compare (it fails on a run its start and end dominate).
    small = ["--eval_split=validation[:64]", "--test_split=test[:64]", "--batch_size=16"]
    checks = _gpu_check(tmp_path / "checks", "--checks=overflow,compare", "--steps=2", "--", *small,
                        "--backbone=small_cnn", "--alpha=1.0", "--image_size=32", f"--weights={pretrained_run}",
                        "--unfreeze=2")
    for path in ("graph", "xla"):
        overflow = checks["overflow"][path]
        assert overflow["weights_finite"] and overflow["weights_equal_across_replicas"], overflow
        assert overflow["loss_scale"] == [overflow["initial_loss_scale"] / 2] * 2, overflow
    assert {row["status"] for row in checks["compare"]["modes"].values()} == {"done"}
    assert set(checks["compare"]["modes"]) == {"scratch", "frozen", "finetune", "staged", "lora"}
    results = json.loads((tmp_path / "checks" / "compare" / "lora" / "results.json").read_text())
    assert results["devices"]["replicas"] == 2 and results["backbone"] == "small_cnn"

    soak = _gpu_check(tmp_path / "soak", "--checks=soak", "--soak_steps=60", "--steps=3", "--", *small)["soak"]
    assert soak["steps"] == 60 and soak["samples"] >= 4
    assert soak["threads"]["peak_last_third"] > 0 and soak["rss_mb"]["peak_last_third"] > 0
    results = json.loads((tmp_path / "soak" / "soak" / "results.json").read_text())
    assert results["devices"]["replicas"] == 2 and results["devices"]["jit_compile"]
    assert results["global_step"] == 60 and results["test_examples"] == 64


def test_an_unknown_check_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--checks=overflow,nope", f"--out={tmp_path}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--checks=overflow,nope: no check 'nope' (choose from "
                                                          "overflow, compare, soak, benchmark)")
    assert not os.listdir(tmp_path)
