"""engine/core/checkpoints.py and the loop's guards: exact resume after SIGKILL, preemption by SIGTERM,
checkpoints never half-written, divergence, determinism.

The reference is one uninterrupted run; interrupted and resumed runs of the same command must end with
the same results and bitwise the same weights (CPU, --seed --deterministic).
"""

import json
import os
import re
import shutil
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED
from helpers import launch, launch_in_process, output, shared, stopped_after_checkpoint, tiny_config, tiny_flags, train_run

pytestmark = pytest.mark.slow  # Every test here runs whole trainings, most in subprocesses.

TIMING = ("images_per_sec", "seconds", "wall_seconds")


def resumable(data_dir, model_dir, **overrides):
    """A run to interrupt: 2 epochs of 30 single-step calls, a checkpoint every 5 steps."""
    values = dict(
        data_dir=data_dir, model_dir=str(model_dir), train_split="train[:3%]", steps_per_epoch=30, batch_size=16,
        image_size=48, epochs=2, steps_per_loop=1, checkpoint_every=5, dropout=0.3, augment="flip",
    )
    values.update(overrides)
    return tiny_flags(tiny_config(**values))


def read(model_dir, name):
    with open(os.path.join(model_dir, name)) as f:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in f]
        return json.load(f)


def without_timing(record):
    return {key: value for key, value in record.items() if key not in TIMING}


def weights(model_dir):
    return [w.numpy() for w in keras.saving.load_model(os.path.join(model_dir, "model.keras")).weights]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run, made once per session (a test that changes it copies it first)."""
    def make(path):
        result = launch(*resumable(data_dir, os.path.join(path, "run")))
        assert result.returncode == 0, result.stderr[-3000:]

    return os.path.join(shared(tmp_path_factory, "checkpoints_reference", make), "run")


def _checkpoint_steps(model_dir):
    state = os.path.join(model_dir, "checkpoints", "checkpoint")
    if not os.path.exists(state):
        return []
    with open(state) as f:
        return [int(step) for step in re.findall(r'all_model_checkpoint_paths: ".*ckpt-(\d+)"', f.read())]


def _interrupt(args, model_dir, sig, at_step):
    """Starts launch.py, which stops itself right after its checkpoint at `at_step` (the test cue of
    engine/core/checkpoints.py), sends it `sig`, lets it go on and waits for it: the state the signal finds is
    known, whatever the machine's speed. Returns the process (`output(process)`: what it printed)."""
    process = stopped_after_checkpoint(args, at_step, f"{model_dir}.log")
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    process.wait(timeout=300)
    return process


def resume(args, caplog):
    """Reruns the same command, in this process (only the interrupted run's process is the subject); returns
    its log lines."""
    caplog.set_level("INFO", logger="absl")
    caplog.clear()
    status, stderr = launch_in_process(*args)
    assert status == 0, stderr[-3000:] + caplog.text[-3000:]
    return caplog.text


def assert_same_run(model_dir, reference):
    assert without_timing(read(model_dir, "results.json")) == without_timing(read(reference, "results.json"))
    assert [without_timing(r) for r in read(model_dir, "metrics.jsonl")] == [
        without_timing(r) for r in read(reference, "metrics.jsonl")
    ]
    for ours, theirs in zip(weights(model_dir), weights(reference)):
        np.testing.assert_array_equal(ours, theirs)


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_results(data_dir, reference, tmp_path, caplog):
    model_dir = str(tmp_path / "killed")
    args = resumable(data_dir, model_dir)
    step = 10  # Mid-epoch 1.
    killed = _interrupt(args, model_dir, signal.SIGKILL, step)
    assert killed.returncode == -signal.SIGKILL
    assert max(_checkpoint_steps(model_dir)) == step and not os.path.exists(os.path.join(model_dir, "results.json"))

    resumed = resume(args, caplog)
    assert f"Resuming from {model_dir}/checkpoints/ckpt-{step} (step {step}, epoch 1)" in resumed
    assert_same_run(model_dir, reference)


@pytest.mark.parametrize("sig, status, word", [
    (signal.SIGTERM, EXIT_PREEMPTED, "Preempted"),  # Schedulers' and cloud preemption's signal: exit 75.
    (signal.SIGINT, EXIT_INTERRUPTED, "Interrupted"),  # Ctrl-C: exit 130.
])
def test_sigterm_and_ctrl_c_checkpoint_exit_in_one_line_and_the_rerun_finishes_the_same(
    data_dir, reference, tmp_path, sig, status, word, caplog
):
    model_dir = str(tmp_path / "stopped")
    args = resumable(data_dir, model_dir)
    periodic = 10
    stopped = _interrupt(args, model_dir, sig, periodic)
    stderr = output(stopped)
    assert stopped.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    saved = re.search(rf"{word}: saved (\S+) at step (\d+); rerun the same command", stderr)
    assert saved, stderr[-3000:]
    # The step the signal found (at or after the periodic checkpoint, whether or not it is one of them).
    assert saved.group(1).endswith(f"ckpt-{saved.group(2)}") and periodic <= int(saved.group(2)) < 60

    resumed = resume(args, caplog)
    assert f"(step {saved.group(2)}," in resumed
    assert_same_run(model_dir, reference)


def test_a_half_written_checkpoint_is_never_the_one_resumed(data_dir, reference, tmp_path, caplog):
    """A kill while TensorFlow writes ckpt-N leaves its files (or their temporary directory) but not the
    `checkpoint` state file's pointer: the resumed run starts from the previous checkpoint."""
    model_dir = str(tmp_path / "run")
    shutil.copytree(reference, model_dir)
    latest = max(_checkpoint_steps(model_dir))
    for partial in (f"ckpt-{latest + 5}.index", f"ckpt-{latest + 5}.data-00000-of-00001"):
        with open(os.path.join(model_dir, "checkpoints", partial), "wb") as f:
            f.write(b"\x00half written")
    os.makedirs(os.path.join(model_dir, "checkpoints", f"ckpt-{latest + 5}_temp"))
    caplog.set_level("INFO", logger="absl")
    status, stderr = launch_in_process(*resumable(data_dir, model_dir, epochs=3))  # The process is not the subject.
    assert status == 0, stderr[-3000:]
    assert f"ckpt-{latest} (step {latest}, epoch 3)" in caplog.text
    assert read(model_dir, "results.json")["epochs_completed"] == 3


def _killed_mid_run(data_dir, tmp_path, name):
    """A run SIGKILLed after its checkpoint at step 20: (args, model_dir, the steps of the checkpoint files
    present, newest first). From the files, not the state file: a kill between TensorFlow's writing a
    checkpoint and its updating (or sweeping) the state file leaves one more or one less listed there."""
    model_dir = str(tmp_path / name)
    args = resumable(data_dir, model_dir)
    assert _interrupt(args, model_dir, signal.SIGKILL, 20).returncode == -signal.SIGKILL
    files = os.listdir(os.path.join(model_dir, "checkpoints"))
    return args, model_dir, sorted((int(m) for m in re.findall(r"ckpt-(\d+)\.index", " ".join(files))), reverse=True)


def test_a_truncated_latest_checkpoint_is_skipped_and_the_run_ends_the_same(data_dir, reference, tmp_path, caplog):
    args, model_dir, steps = _killed_mid_run(data_dir, tmp_path, "truncated")
    data = os.path.join(model_dir, "checkpoints", f"ckpt-{steps[0]}.data-00000-of-00001")
    os.truncate(data, os.path.getsize(data) // 2)  # A full disk or a crash while copying.

    resumed = resume(args, caplog)
    newest, previous = (f"{model_dir}/checkpoints/ckpt-{step}" for step in steps[:2])
    assert f"Checkpoint {newest} is damaged (Read less bytes than requested)" in resumed
    assert f"Restored {previous} instead of the damaged {newest}" in resumed
    assert f"Resuming from {previous} (step {steps[1]}," in resumed
    assert_same_run(model_dir, reference)


def test_a_lost_state_file_is_rebuilt_and_the_run_resumes_from_the_newest(data_dir, reference, tmp_path, caplog):
    args, model_dir, steps = _killed_mid_run(data_dir, tmp_path, "lost_state")
    os.remove(os.path.join(model_dir, "checkpoints", "checkpoint"))

    resumed = resume(args, caplog)
    assert f"was missing: rebuilt from the {len(steps)} checkpoints present" in resumed
    assert f"Resuming from {model_dir}/checkpoints/ckpt-{steps[0]} (step {steps[0]}," in resumed
    assert_same_run(model_dir, reference)
    kept = [name for name in os.listdir(os.path.join(model_dir, "checkpoints")) if name.endswith(".index")]
    assert len(kept) == 3, f"the rebuilt checkpoints were never cleaned up: {sorted(kept)}"  # --keep_checkpoints


def test_a_corrupted_checkpoint_is_called_damaged_and_none_intact_is_one_line(data_dir, reference, tmp_path, caplog):
    model_dir = str(tmp_path / "corrupted")
    shutil.copytree(reference, model_dir)
    steps = sorted(_checkpoint_steps(model_dir), reverse=True)
    for step in steps:  # One bit flipped in each: the checksums catch it.
        data = os.path.join(model_dir, "checkpoints", f"ckpt-{step}.data-00000-of-00001")
        with open(data, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0x10]))
    status, stderr = launch_in_process(*resumable(data_dir, model_dir, epochs=3))  # A bug would raise here.
    assert status == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(
        f"error: --model_dir={model_dir}: every checkpoint is damaged (newest {model_dir}/checkpoints/ckpt-{steps[0]}: "
    ) and "Checksum does not match" in errors[0], stderr[-3000:]
    assert "does not fit" not in stderr + caplog.text
    assert f"Checkpoint {model_dir}/checkpoints/ckpt-{steps[-1]} is damaged" in caplog.text


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    data_dir, pretrained_run, tmp_path
):
    model_dir = str(tmp_path / "diverged")
    # Every conv trains with BatchNorm frozen (a fixed affine map: no renormalisation to hide behind) and
    # an absurd learning rate after a warm-up step at 0: the second step's update explodes the weights.
    args = resumable(data_dir, model_dir, mode="finetune", unfreeze=6, weights=pretrained_run,
                     optimizer="sgd", learning_rate=1e30, warmup_steps=10, checkpoint_every=1,
                     dropout=0.0, augment="none")
    status, stderr = launch_in_process(*args)  # A bug would raise here.
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == EXIT_DIVERGED, stderr[-3000:]
    match = re.fullmatch(r"error: training diverged: not finite from step (\d+) to (\d+); last good "
                         r"checkpoint: (\S+) \(lower --learning_rate, or check the data\)", errors[0])
    assert match and len(errors) == 1, stderr[-3000:]
    first_bad, last_good = int(match.group(1)), match.group(3)
    from transfer_engine.engine.core.loop import NAN_PATIENCE
    assert int(match.group(2)) == first_bad + NAN_PATIENCE - 1, "the range names the calls that failed, one step each"
    # The newest checkpoint whose weights a later call ran with a finite loss: from before step first_bad - 1.
    proven = max(step for step in _checkpoint_steps(model_dir) if step < first_bad - 1)
    assert last_good.endswith(f"ckpt-{proven}") and proven > 0
    reader = tf.train.load_checkpoint(last_good)
    values = [reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if name.startswith("model")]
    assert values and all(np.all(np.isfinite(v)) for v in values if np.issubdtype(v.dtype, np.floating))
    assert not os.path.exists(os.path.join(model_dir, "results.json"))


def test_the_same_seed_gives_identical_results(tiny, tmp_path):
    config = tiny(steps_per_epoch=6, epochs=2, dropout=0.3, augment="flip_crop")
    first = train_run(config, tmp_path / "first")
    second = train_run(config, tmp_path / "second")
    assert without_timing(first) == without_timing(second)
    for a, b in zip(weights(tmp_path / "first"), weights(tmp_path / "second")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_keep_best_with_ema_saves_the_best_epochs_moving_averages(tiny, tmp_path):
    """--keep_best and --ema together: model.keras holds the averages of the best epoch's checkpoint (restored
    first, then averaged), not that checkpoint's raw weights."""
    from transfer_engine.engine.core import assembly
    from transfer_engine.engine.core.run_dir import RunDir
    from helpers import replace

    config = tiny(ema=0.9, keep_best=True, epochs=3, steps_per_epoch=4, learning_rate=0.01, eval_split="test[:60]",
                  model_dir=str(tmp_path / "run"))
    results = train_run(config, tmp_path / "run")
    run = assembly.build(replace(config, model_dir=str(tmp_path / "run")), pretrained=False)
    assert run.checkpoints.restore_best() == next(
        record["global_step"] for record in RunDir(str(tmp_path / "run")).metrics() if record["epoch"] == results["best_epoch"])
    saved = {weight.path: weight.numpy() for weight in keras.saving.load_model(str(tmp_path / "run" / "model.keras")).weights}
    optimizer = run.optimizer
    for variable in run.trained_variables:
        average = optimizer._model_variables_moving_average[optimizer._get_variable_index(variable)].numpy()
        assert not np.array_equal(average, variable.numpy()), variable.path  # The averages differ from the weights.
        np.testing.assert_array_equal(saved[variable.path], average, err_msg=variable.path)


@pytest.mark.slow
def test_early_stopping_stops_when_patience_runs_out_and_keep_best_reports_the_best_epoch(tiny, tmp_path):
    from transfer_engine.engine.core.run_dir import RunDir
    from helpers import digest_tree

    run = tmp_path / "run"
    config = tiny(model_dir=str(run), epochs=10, steps_per_epoch=4, learning_rate=0.01, early_stopping=2,
                  keep_best=True, keep_checkpoints=20, eval_split="test[:60]")
    status, stderr = launch_in_process(*tiny_flags(config))
    assert status == 0, stderr
    records = RunDir(str(run)).metrics()
    with open(run / "results.json") as f:
        results = json.load(f)
    history = [record["eval_accuracy"] for record in records]
    best = int(np.argmax(history))
    # It stopped at the first epoch after which two had passed without a rise, and not before.
    assert results["stopped_early"] and len(history) < 10, history
    assert len(history) - 1 - best == 2
    assert all(k - int(np.argmax(history[:k + 1])) < 2 for k in range(len(history) - 1)), history
    # keep_best: the best epoch's metrics and weights (its rolling checkpoint's), not the last epoch's.
    assert results["best_epoch"] == best + 1 and results["eval_accuracy"] == history[best]
    trained = keras.saving.load_model(str(run / "model.keras"))

    def weights_of(step):
        model = keras.saving.load_model(str(run / "model.keras"))
        tf.train.Checkpoint(model=model).read(str(run / "checkpoints" / f"ckpt-{step}")).assert_existing_objects_matched()
        return [weight.numpy() for weight in model.weights]

    assert all(np.array_equal(a.numpy(), b) for a, b in zip(trained.weights, weights_of(records[best]["global_step"])))
    assert not all(np.array_equal(a.numpy(), b) for a, b in zip(trained.weights, weights_of(records[-1]["global_step"])))
    # The rerun has nothing to do.
    before = digest_tree(run)
    status, stderr = launch_in_process(*tiny_flags(config))
    assert status == 0 and digest_tree(run) == before, stderr


@pytest.mark.slow
def test_a_finished_run_rerun_with_fewer_epochs_says_how_many_it_trained(tiny, tmp_path, caplog):
    config = tiny(epochs=2, train_split="train[:1%]")
    results = train_run(config, tmp_path / "run")
    with caplog.at_level("INFO"):
        assert train_run(tiny(epochs=1, train_split="train[:1%]"), tmp_path / "run") == results
    assert f"Complete: this run has trained 2 epochs (step {results['global_step']}); nothing changed." in caplog.text
