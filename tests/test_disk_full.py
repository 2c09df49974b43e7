"""A full disk mid-run: one line naming the file, exit 2, the last good checkpoint intact, no half-written
file, and the same command resumes once there is space. Runs --model_dir on a 1 MB tmpfs (root only)."""

import os
import subprocess

import keras
import pytest

from transfer_engine.engine.core.checkpoints import damage
from helpers import launch, launch_in_process, tiny_config, tiny_flags

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem; grow(megabytes) frees space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                          capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (and a machine that allows mounts)")

    def grow(megabytes):
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", str(mount)], check=True)


def _partials(model_dir):
    return [name for _, _, names in os.walk(model_dir) for name in names if name.startswith(".partial-")]


@pytest.mark.parametrize("epochs, fails_at", [
    (4, "checkpoints/ckpt-99"),  # Two checkpoints fit, the third does not.
    (2, "backbone.weights.h5"),  # Training ends; model.keras fits, its backbone file does not.
])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_the_rerun_finishes(
    data_dir, small_disk, epochs, fails_at, caplog
):
    mount, grow = small_disk
    model_dir = str(mount / "run")
    args = tiny_flags(tiny_config(data_dir=data_dir, model_dir=model_dir, train_split="train[:3%]",
                                  batch_size=16, epochs=epochs, test_split="test[100:400]"))
    full = launch(*args)
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on the device writing {model_dir}/{fails_at}: free space, then "
                      "rerun the same command (it resumes from the last checkpoint)"], full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert damage(f"{model_dir}/checkpoints/ckpt-66") is None, "the last good checkpoint was damaged"
    assert not _partials(model_dir) and not os.path.exists(f"{model_dir}/{fails_at}")

    grow(8)
    caplog.set_level("INFO", logger="absl")
    status, stderr = launch_in_process(*args)  # The rerun's process is not the subject.
    assert status == 0, stderr[-3000:]
    assert f"Resuming from {model_dir}/checkpoints/ckpt-66 (step 66," in caplog.text
    keras.saving.load_model(f"{model_dir}/model.keras")
    assert os.path.getsize(f"{model_dir}/backbone.weights.h5") > 0 and not _partials(model_dir)


def test_a_full_temporary_directory_is_named_as_such_and_the_rerun_finishes(data_dir, small_disk, tmp_path):
    """TensorFlow (autograph) and the staging of model.keras write to the temporary directory (TMPDIR): when
    that is full, the line names it, not --model_dir's device, which has space (and TensorFlow's tracing,
    unable to write there, is not left running for many minutes)."""
    mount, grow = small_disk
    (mount / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # 64 KB left: less than model.keras.
    model_dir = str(tmp_path / "run")
    args = tiny_flags(tiny_config(data_dir=data_dir, model_dir=model_dir))
    full = launch(*args, env={"TMPDIR": str(mount)})
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on the device writing {mount} (the temporary directory, TMPDIR): free "
                      "space, then rerun the same command (it resumes from the last checkpoint)"], full.stderr[-3000:]
    assert "Traceback" not in full.stderr and not os.path.exists(f"{model_dir}/model.keras")

    (mount / "filler").unlink()
    resumed = launch(*args, env={"TMPDIR": str(mount)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keras.saving.load_model(f"{model_dir}/model.keras")
