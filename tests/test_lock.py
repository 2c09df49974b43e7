"""One run per --model_dir at a time: engine/core/run_dir.py's lock, in one process and across processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from transfer_engine.engine.core.run_dir import LOCK, RunDir
from transfer_engine.errors import ConfigError
from helpers import ROOT, launch, stopped_after_checkpoint, tiny_config, tiny_flags


def test_a_held_directory_is_refused_naming_the_holder_and_released_after(tmp_path):
    run_dir = RunDir(str(tmp_path / "run"))
    with run_dir.lock():
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(ConfigError) as refused:
            with RunDir(str(tmp_path / "run")).lock():
                pass
        assert str(refused.value).startswith(
            f"--model_dir={tmp_path / 'run'}: is in use by another run (pid {os.getpid()} on {socket.gethostname()}, since "
        ) and str(refused.value).endswith("; wait for it to end or use another --model_dir")
    assert not (tmp_path / "run" / LOCK).exists()
    with run_dir.lock():  # Free again.
        pass


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": 0}))
    with caplog.at_level("WARNING"):
        with RunDir(str(tmp_path)).lock():
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "took over the lock of a run that ended without releasing it (pid 999999 on elsewhere" in caplog.text


@pytest.mark.parametrize("text", ["12345", '{"pid": 7}', "[1, 2]", "not json at all"])
def test_a_lock_file_of_another_shape_is_taken_over_as_stale(tmp_path, caplog, text):
    """A bare pid, unexpected JSON or text (another tool's, or damaged): a warning, not a traceback."""
    (tmp_path / LOCK).write_text(text)
    with caplog.at_level("WARNING"):
        with RunDir(str(tmp_path)).lock():
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "took over the lock of a run that ended without releasing it (a lock file holding " in caplog.text


@pytest.mark.slow
def test_a_second_run_on_a_training_directory_exits_2_and_a_killed_runs_lock_is_taken_over(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    args = tiny_flags(tiny_config(data_dir=data_dir, model_dir=model_dir, epochs=2, steps_per_loop=1,
                                  checkpoint_every=2))
    # Still training and holding the lock, whatever the machine's speed: it stops itself after checkpoint 2.
    first = stopped_after_checkpoint(args, 2, tmp_path / "first.log")
    second = launch(*args)
    assert first.poll() is None
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --model_dir={model_dir}: is in use by another run (pid {first.pid} on "
                      f"{socket.gethostname()}, since " + errors[0].split(", since ")[1]], second.stderr[-3000:]
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert os.path.exists(os.path.join(model_dir, LOCK)), "a killed run leaves its lock file"
    third = launch(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of a run that ended without releasing it (pid {first.pid}" in third.stderr
    assert "Resuming from" in third.stderr and not os.path.exists(os.path.join(model_dir, LOCK))


@pytest.mark.slow
@pytest.mark.parametrize("job", ["evaluate", "export", "predict"])
def test_jobs_that_read_a_run_refuse_one_that_is_training_naming_it(pretrained_run, tmp_path, job):
    """Evaluate wrote a mid-run checkpoint's evaluation.json into the live directory, or blamed the
    configuration when training rotated that checkpoint away; predict and export said 'train it first'."""
    import shutil

    from helpers import launch_in_process

    run = str(tmp_path / "run")
    shutil.copytree(pretrained_run, run)
    with RunDir(run).lock():  # As a training process holds it.
        status, stderr = launch_in_process(f"--job={job}", f"--model_dir={run}", f"--inputs={run}/confusion.png")
    assert status == 2, stderr
    assert stderr.startswith(f"error: --model_dir={run}: is training now (pid {os.getpid()} on ")
    assert stderr.strip().endswith(f"--job={job} reads a finished run; wait for it to end")
    assert not os.path.exists(os.path.join(run, "evaluation.json"))
    status, _ = launch_in_process(f"--job={job}", f"--model_dir={run}", f"--inputs={run}/confusion.png")
    assert status == 0  # Once it ends.


@pytest.mark.slow
def test_two_runs_writing_one_cache_at_once_each_end_as_it_would_alone(data_dir, tmp_path):
    """Runs sharing --cache=DIR: the first is stopped while it writes the cache, the second runs whole
    meanwhile, then the first goes on. Both finish with the results and weights of a run caching in memory
    alone, and the folder then holds each split's files once, no writer's."""
    cache = tmp_path / "cache"

    def args(name, cache):
        return tiny_flags(tiny_config(data_dir=data_dir, model_dir=str(tmp_path / name), cache=cache))

    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args("a", str(cache))], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (cache.exists() and any(name.endswith("lockfile") for name in os.listdir(cache))):
        assert first.poll() is None and time.time() < deadline, "the first run wrote no cache"
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # Mid-write (TensorFlow's lockfile is there), whatever the speed.
    second = launch(*args("b", str(cache)))
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert first.returncode == 0, stderr[-3000:]
    alone = launch(*args("alone", "memory"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("a", "b", "alone")]
    timing = ("images_per_sec", "seconds", "wall_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in results[:2]] == [
        {k: v for k, v in results[2].items() if k not in timing}] * 2
    names = sorted(os.listdir(cache))
    assert len([name for name in names if name.endswith(".index")]) == 3, names  # train, eval, test.
    assert not [name for name in names if ".writing-" in name or "lockfile" in name], names
