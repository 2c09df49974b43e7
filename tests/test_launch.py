"""launch.py as a user runs it: the offline frozen default end to end, evaluate, and bad input."""

import json
import re
import subprocess
import sys
import os
import shutil

import keras
import numpy as np
import pytest

from transfer_engine.data import sources
from transfer_engine.engine.core.run_dir import read_flagfile
from helpers import ROOT, digest_tree, launch, launch_in_process, load_weights_file, tiny_config, tiny_flags, train_run
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier

SHIPPED = os.path.join(ROOT, "models", "pretrained", "mobilenet_v2_0.35_96_fmnist7.weights.h5")


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_frozen_default_trains_writes_the_run_dir_and_evaluate_reproduces_it(data_dir, tmp_path):
    model_dir = str(tmp_path / "frozen")
    quick = ["--epochs=2", "--steps_per_epoch=3", "--eval_split=validation[:60]", "--test_split=test[:300]"]
    result = launch("--flagfile=configs/frozen.flags", f"--model_dir={model_dir}", f"--data_dir={data_dir}", *quick)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2/2" in result.stderr and "img_s=" in result.stderr, "no progress bar"
    assert "Devices: CPU x 1" in result.stderr and "precision float32, XLA off" in result.stderr
    for name in ("flags.txt", "checkpoints", "logs/train", "logs/eval", "metrics.jsonl", "results.json",
                 "model.keras", "backbone.weights.h5"):
        assert os.path.exists(os.path.join(model_dir, name)), f"run dir lacks {name}"

    results = read_json(os.path.join(model_dir, "results.json"))
    for key in ("mode", "backbone", "dataset", "global_step", "epochs_completed", "trainable_params",
                "non_trainable_params", "train_loss", "train_accuracy", "eval_accuracy", "test_accuracy",
                "images_per_sec"):
        assert results[key] is not None, f"results.json lacks {key}"
    assert (results["mode"], results["backbone"], results["global_step"], results["epochs_completed"]) == (
        "frozen", "mobilenet_v2", 6, 2
    )
    assert results["test_examples"] == 300  # The shipped sample holds the three classes only.
    # The confusion matrix: the same exact evaluation as the accuracies, as counts, a picture and an image in TensorBoard.
    matrix = results["test_confusion_matrix"]
    counts = np.array(matrix["counts"])
    assert matrix["classes"] == results["class_names"] == ["Shirt", "T-shirt/top", "Pullover"]
    assert counts.sum() == 300 and np.trace(counts) == round(results["test_accuracy"] * 300)
    for k, name in enumerate(matrix["classes"]):
        assert counts[k, k] / counts[k].sum() == pytest.approx(results["test_class_accuracy"][name], abs=1e-12)
    with open(os.path.join(model_dir, "confusion.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(model_dir, "logs", "test"), size_guidance={"tensors": 0}).Reload()
    assert "confusion_matrix" in events.Tags()["tensors"]
    [image] = events.Tensors("confusion_matrix")
    assert image.step == 6 and tf.make_ndarray(image.tensor_proto)[2:].size == 1  # [width, height, PNG].
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    # Frozen means frozen: the backbone leaves the run bitwise as it came from the shipped file.
    shipped, trained = load_mobilenet(SHIPPED), load_mobilenet(os.path.join(model_dir, "backbone.weights.h5"))
    assert all(np.array_equal(shipped[k], trained[k]) for k in shipped), "frozen backbone weights moved"
    assert results["trainability_audit"]["frozen_changed"] == 0

    flags_file = os.path.join(model_dir, "flags.txt")
    assert read_flagfile(flags_file)["image_size"] == "96"
    evaluation = launch(f"--flagfile={flags_file}", "--job=evaluate")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    evaluated = read_json(os.path.join(model_dir, "evaluation.json"))
    assert evaluated["test_accuracy"] == results["test_accuracy"]
    assert evaluated["eval_accuracy"] == results["eval_accuracy"]
    assert evaluated["test_examples"] == results["test_examples"]
    assert evaluated["test_confusion_matrix"] == matrix


def load_mobilenet(path):
    backbone = build_classifier(
        backbone="mobilenet_v2", image_size=96, channels=1, num_classes=3, alpha=0.35
    ).get_layer(BACKBONE_LAYER)
    backbone.load_weights(path)
    return {weight.path: weight.numpy() for weight in backbone.weights}


@pytest.fixture(scope="module")
def earlier_run(pretrained_run, tmp_path_factory):
    """A copy of a finished run, which no bad input may touch."""
    path = str(tmp_path_factory.mktemp("earlier") / "run")
    shutil.copytree(pretrained_run, path)
    return path


@pytest.fixture(scope="module")
def wrong_architecture(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wrong") / "mobilenet.weights.h5")
    build_classifier(backbone="mobilenet_v2", image_size=32, channels=1, num_classes=3, alpha=0.35).get_layer(
        BACKBONE_LAYER
    ).save_weights(path)
    return path


# The bad-input catalogue: every entry is one line naming the flag (or file) and the value, exit 2,
# no traceback, and the earlier run in --model_dir untouched. ({wrong}: weights of another architecture;
# {file}: a regular file; {flagfile}: a flagfile with a stray line; {run}: the earlier run.) An entry in
# slow(...) reaches the data and the model, as others before it do (seconds each): in the full suite only.
def slow(bad, message):
    return pytest.param(bad, message, marks=pytest.mark.slow, id=" ".join(bad))


BAD_INPUT = [
    (["--backbone=vgg99"], "--backbone=vgg99: must be one of"),
    (["--dataset=no_such_data"], "--dataset=no_such_data: is not a TFDS dataset"),
    (["--mode=bogus"], "--mode=bogus: must be one of scratch, frozen, finetune"),
    (["--optimizer=lion"], "--optimizer=lion: must be one of adam, sgd, rmsprop, adamw"),
    (["--precision=fp8"], "--precision=fp8: must be one of auto, float32, mixed_float16, mixed_bfloat16"),
    (["--strategy=parameter_server"], "--strategy=parameter_server: must be one of"),
    (["--batch_size=0"], "--batch_size=0: must be positive"),
    (["--epochs=0"], "--epochs=0: must be positive"),
    (["--learning_rate=-0.1"], "--learning_rate=-0.1: must be positive"),
    (["--image_size=0"], "--image_size=0: must be positive"),
    (["--feature_cache_max_gb=0"], "--feature_cache_max_gb=0.0: must be positive"),
    (["--cache_max_gb=-1"], "--cache_max_gb=-1.0: must be positive"),
    (["--label_smoothing=1"], "--label_smoothing=1.0: must be in [0, 1)"),
    (["--ema=1"], "--ema=1.0: must be in [0, 1), e.g. 0.99 (0: off)"),
    (["--early_stopping=-1"], "--early_stopping=-1: must not be negative"),
    (["--keep_best", "--eval_split="], "--keep_best=True: needs an eval split to watch (--eval_split is '')"),
    (["--grad_accum_steps=3"], "--grad_accum_steps=3: must divide --batch_size=8"),
    (["--grad_accum_steps=2", "--cpu_replicas=2"], "--grad_accum_steps=2: runs on one replica only, not 2"),
    (["--class_weight=inverse"], "--class_weight=inverse: must be one of none, balanced"),
    slow(["--label_smoothing=0.1"], "--model_dir={run}: holds a run with --label_smoothing=0.0, not 0.1"),
    (["--strategy=default", "--cpu_replicas=2"], "--cpu_replicas=2: needs --strategy=mirrored or auto, not default"),
    (["--batch_size=abc"], "flag --batch_size=abc: invalid literal"),
    (["--cpu_replicas=2", "--batch_size=9"], "--batch_size=9: must be divisible by the 2 replicas"),
    (["--mode=finetune", "--unfreeze=99"], "--unfreeze=99: the backbone has only 6 layers with weights"),
    slow(["--mode=finetune", "--unfreeze_from=nope"], "--unfreeze_from=nope: no such backbone layer"),
    (["--mode=finetune", "--trainable_regex=["], "--trainable_regex=[: not a regular expression"),
    (["--head_epochs=1"], "--head_epochs=1: stages a --mode=finetune run only"),
    (["--job=compare"], "--unfreeze=0: --job=compare needs exactly one of --unfreeze, --unfreeze_from"),
    (["--job=compare", "--unfreeze=2", "--test_split=validation"], "--test_split=validation: not a split of"),
    (["--label_subset=6,0,2", "--eval_split=test[:12]"], "--label_subset=6,0,2: label 6 does not occur in --eval_split=test[:12]"),
    (["--train_split=train[:0]"], "--train_split=train[:0]: selects no examples"),
    (["--label_subset=", "--train_split=train[:2]"],
     "--train_split=train[:2]: has no image of class T-shirt/top (pick a split that has some"),
    (["--test_split=validation"], "--test_split=validation: not a split of fashion_mnist"),
    (["--flagfile=/no/such.flags"], "--flagfile: Unable to open flagfile"),
    (["--flagfile={flagfile}"], "unexpected argument 'batch_size 8'"),
    (["--mode=frozen", "--weights=/no/such.weights.h5"], "--weights=/no/such.weights.h5: no such file"),
    (["--mode=frozen", "--weights={wrong}"], "--weights={wrong}: does not fit this backbone"),
    (["--model_dir={file}/run"], "--model_dir={file}/run: is not writable (Not a directory)"),
    slow(["--model_dir={long}"], "--model_dir={long}: is too long: files below it would have paths of "),
    slow(["--backbone=mobilenet_v2", "--alpha=0.35"], "--model_dir={run}: holds a run with --backbone=small_cnn"),
    slow(["--learning_rate=0.01"], "--model_dir={run}: holds a run with --learning_rate=0.001, not 0.01"),
    (["--seed=7"], "--model_dir={run}: holds a run with --seed=42, not 7"),  # Another order of examples.
    slow(["--shuffle_buffer=50"], "--model_dir={run}: holds a run with --shuffle_buffer=10000, not 50"),
    (["--strategy=multi_worker"], "--strategy=multi_worker: needs TF_CONFIG"),
    (["--strategy=tpu"], "--strategy=tpu: no TPU found"),
    (["--job=export", "--export_format=saved_model,onnx"],
     "--export_format=saved_model,onnx: each must be one of saved_model, litert, litert_int8"),
    (["--job=export", "--max_class_drop=-5"], "--max_class_drop=-5.0: must be 0 or more accuracy points"),
    (["--job=predict"], "--inputs=: --job=predict needs images: files, folders or globs"),
    (["--job=predict", "--inputs=/no/such/*.png,/no/file.jpg"], "--inputs=/no/such/*.png,/no/file.jpg: no image file found"),
    (["--job=predict", "--inputs={file}", "--top_k=0"], "--top_k=0: must be positive"),
    (["--job=predict", "--inputs={file}", "--min_confidence=1.5"], "--min_confidence=1.5: must be in [0, 1)"),
    (["--target_accuracy=0"], "--target_accuracy=0.0: must be in (0, 1]"),
    (["--unknown_dir=/no/such/folder"], "--unknown_dir=/no/such/folder: no such folder"),
    (["--unknown_dir={empty}"], "--unknown_dir={empty}: holds no image file"),
    (["--job=inspect", "--near_duplicate=-0.5"], "--near_duplicate=-0.5: must be in [0, 1)"),
    (["--job=evaluate", "--label_subset=0,2"], "--label_subset=0,2: the run in {run} has --label_subset=6,0,2"),
    (["--job=export", "--image_size=64"], "--image_size=64: the run in {run} has --image_size=32"),
    (["--job=predict", "--inputs={file}", "--backbone=resnet50"], "--backbone=resnet50: the run in {run} has --backbone=small_cnn"),
]


@pytest.fixture(scope="module")
def stray_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stray")
    (folder / "plain_file").write_text("not a directory")
    (folder / "stray.flags").write_text("--epochs=1\nbatch_size 8\n")
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("no image here")
    long = os.path.join(str(folder), *["d" * 200] * 20)  # Each name allowed; the checkpoint paths below it not.
    return {"file": str(folder / "plain_file"), "flagfile": str(folder / "stray.flags"), "long": long,
            "empty": str(folder / "empty")}


@pytest.mark.parametrize("bad, message", [
    entry if hasattr(entry, "marks") else pytest.param(*entry, id=" ".join(entry[0])) for entry in BAD_INPUT
])
def test_bad_input_is_one_line_exit_2_and_leaves_the_earlier_run_alone(
    data_dir, earlier_run, wrong_architecture, stray_files, bad, message, monkeypatch
):
    """Through launch.py's own parsing and main, in this process (a bug would raise here)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    before = digest_tree(earlier_run)
    config = tiny_config(data_dir=data_dir, model_dir=earlier_run, train_split="train[:3%]")
    names = dict(stray_files, wrong=wrong_architecture, run=earlier_run)
    status, stderr = launch_in_process(*tiny_flags(config), *[flag.format(**names) for flag in bad])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2, stderr[-2000:]
    assert errors == [errors[0]] and errors[0].startswith("error: " + message.format(**names)), stderr[-2000:]
    assert digest_tree(earlier_run) == before, "a refused command changed the earlier run's files"
    print(f"\n{' '.join(bad)} -> {errors[0]}")  # The catalogue as a user sees it: pytest -s.


@pytest.mark.slow
@pytest.mark.parametrize("bad, message", [
    (["--batch_size=abc"], "error: flag --batch_size=abc: invalid literal"),  # Refused by the flag parser.
    (["--dataset=no_such_data"], "error: --dataset=no_such_data: is not a TFDS dataset"),  # By a job.
])
def test_bad_input_from_the_command_line_is_one_line_on_stderr_and_exit_2(data_dir, tmp_path, bad, message):
    config = tiny_config(data_dir=data_dir, model_dir=str(tmp_path / "run"))
    result = launch(*tiny_flags(config), *bad, env={"TF_CONFIG": None})
    assert result.returncode == 2, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        line for line in result.stderr.splitlines() if line.startswith(message)
    ] != [], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run"), "a refused command wrote its run dir"


@pytest.mark.slow
def test_a_malformed_tf_config_is_one_line(data_dir, tmp_path):
    config = tiny_config(data_dir=data_dir, model_dir=str(tmp_path / "run"))
    result = launch(*tiny_flags(config), env={"TF_CONFIG": "{not json"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --strategy=auto: TF_CONFIG is not JSON (Expecting property name" in result.stderr


def test_a_bug_keeps_its_traceback_and_is_not_called_bad_input(data_dir, tmp_path, monkeypatch):
    """Only the errors a user should read become one line; anything else escapes launch.main."""
    from transfer_engine.data import sources as sources_module

    def broken(config):
        raise KeyError("a bug in this project")

    monkeypatch.setattr(sources_module, "open_source", broken)
    config = tiny_config(data_dir=data_dir, model_dir=str(tmp_path / "run"))
    with pytest.raises(KeyError, match="a bug in this project"):
        launch_in_process(*tiny_flags(config))


def _block_network(monkeypatch):
    """Every socket connection and name lookup of this process fails, as on a machine without network."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    return attempts


def test_ctrl_c_outside_training_is_one_line_and_exit_130(data_dir, tmp_path, monkeypatch):
    from transfer_engine.engine import jobs

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setitem(jobs.JOBS, "train", interrupted)
    status, stderr = launch_in_process(*tiny_flags(tiny_config(data_dir=data_dir, model_dir=str(tmp_path))))
    assert status == 130
    assert stderr.strip().splitlines() == [
        "error: interrupted (Ctrl-C); rerunning the same command resumes from the last checkpoint"
    ]


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_rerunning_a_finished_run_changes_no_file_and_a_larger_epochs_continues_it(data_dir, tmp_path, caplog):
    config = tiny_config(data_dir=data_dir, model_dir=str(tmp_path / "run"))
    first = train_run(config, tmp_path / "run")
    before = digest_tree(tmp_path / "run")
    status, stderr = launch_in_process(*tiny_flags(config), "--steps_per_loop=3")
    assert status == 0 and not stderr, stderr
    assert digest_tree(tmp_path / "run") == before, "rerunning a finished run changed its files"
    trained = keras.saving.load_model(tmp_path / "run" / "model.keras").get_weights()
    for name in ("model.keras", "backbone.weights.h5"):  # Deleted: the rerun writes them again, the same.
        (tmp_path / "run" / name).unlink()
    with caplog.at_level("WARNING"):
        status, stderr = launch_in_process(*tiny_flags(config))
    assert status == 0 and "model.keras and backbone.weights.h5 missing: written again from" in caplog.text, stderr
    for ours, theirs in zip(keras.saving.load_model(tmp_path / "run" / "model.keras").get_weights(), trained):
        np.testing.assert_array_equal(ours, theirs)
    assert (tmp_path / "run" / "backbone.weights.h5").exists()
    assert read_json(tmp_path / "run" / "results.json") == first
    status, stderr = launch_in_process(*tiny_flags(config), "--epochs=2")
    assert status == 0, stderr
    assert read_json(tmp_path / "run" / "results.json")["global_step"] == 2 * first["global_step"]
    # --model_dir is all evaluate needs: the rest comes from the run's flags.txt.
    status, stderr = launch_in_process("--job=evaluate", f"--model_dir={tmp_path / 'run'}")
    assert status == 0, stderr
    evaluated, results = (read_json(tmp_path / "run" / name) for name in ("evaluation.json", "results.json"))
    assert (evaluated["test_accuracy"], evaluated["test_examples"]) == (results["test_accuracy"], results["test_examples"])


def test_blocking_the_network_blocks_it(monkeypatch):
    import urllib.request

    attempts = _block_network(monkeypatch)
    with pytest.raises(OSError, match="network blocked by the test"):
        urllib.request.urlopen("http://127.0.0.1:9", timeout=1)
    assert attempts


def test_a_download_without_network_fails_at_once_with_what_to_do_offline(tmp_path, monkeypatch):
    """No Debian files, no prepared copy, no network: one probe (TFDS would retry every file for
    minutes), one line naming the flag and the ways to work offline, nothing left in --data_dir."""
    from transfer_engine.data import fashion_mnist_idx

    attempts = _block_network(monkeypatch)
    monkeypatch.setattr(fashion_mnist_idx, "DEBIAN_DIR", str(tmp_path / "no_debian_package"))
    data_dir = tmp_path / "tfds"
    status, stderr = launch_in_process(*tiny_flags(tiny_config(
        data_dir=str(data_dir), model_dir=str(tmp_path / "run"), train_split="train"
    )))
    assert status == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: --dataset=fashion_mnist: must be downloaded, but ")
    assert "cannot be reached" in line and "network blocked by the test" in line
    for advice in ("--data_dir", "--manual_dir", "dataset-fashion-mnist"):
        assert advice in line
    assert len(attempts) == 1, attempts
    assert not data_dir.exists() or not any(data_dir.rglob("*.tfrecord*"))


def test_the_download_probe_takes_any_http_answer_as_reachable():
    import http.server
    import socket
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # Answers 501.
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert sources._unreachable([f"http://127.0.0.1:{server.server_port}/some/file.zip"]) is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert sources._unreachable([f"http://127.0.0.1:{port}/file"]).startswith(f"127.0.0.1:{port} cannot be reached")
    assert sources._unreachable([]) is None


@pytest.mark.slow
def test_the_offline_data_needs_no_network_and_small_runs_resume(data_dir, tmp_path, monkeypatch, caplog):
    attempts = _block_network(monkeypatch)
    model_dir = str(tmp_path / "run")
    config = tiny_config(data_dir=data_dir, model_dir=model_dir, epochs=1, steps_per_epoch=2)
    status, stderr = launch_in_process(*tiny_flags(config))
    assert status == 0, stderr[-2000:]
    status, stderr = launch_in_process(*tiny_flags(config), "--epochs=2")
    assert status == 0, stderr[-2000:]
    # The one lookup allowed: TensorFlow's PreemptionCheckpointHandler asks whether it runs on Google
    # Cloud (to watch for maintenance events), and carries on when the answer does not come.
    assert [args for args in attempts if args[0] != "metadata.google.internal"] == [], attempts
    assert f"Resuming from {model_dir}/checkpoints/ckpt-2 (step 2, epoch 2)" in caplog.text
    results = read_json(os.path.join(model_dir, "results.json"))
    assert (results["epochs_completed"], results["global_step"]) == (2, 4)
    assert load_weights_file(os.path.join(model_dir, "backbone.weights.h5"))


IMAGENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"


@pytest.mark.slow
def test_imagenet_weights_load_from_a_preseeded_keras_cache(data_dir, tmp_path):
    """The real keras.applications path, offline: Keras finds the file in its cache and loads it."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format  # The format of Keras' published files.

    keras.utils.set_random_seed(7)
    seeded = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    with h5py.File(cache / IMAGENET_FILE, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, seeded)

    model_dir = str(tmp_path / "run")
    config = tiny_config(
        data_dir=data_dir, model_dir=model_dir, backbone="mobilenet_v2", alpha=0.35, image_size=96,
        mode="frozen", weights="imagenet", steps_per_epoch=2, test_split="",
    )
    result = launch(*tiny_flags(config), env={"KERAS_HOME": str(tmp_path / "keras_home")})
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_mobilenet(os.path.join(model_dir, "backbone.weights.h5"))
    expected = {weight.path: weight.numpy() for weight in seeded.weights}
    assert sorted(trained) == sorted(expected)
    assert all(np.array_equal(trained[path], expected[path]) for path in expected), (
        "the backbone does not hold the cached imagenet weights"
    )


@pytest.mark.slow
def test_imagenet_download_failure_says_how_to_preseed_the_cache(data_dir, tmp_path):
    config = tiny_config(
        data_dir=data_dir, model_dir=str(tmp_path / "run"), backbone="mobilenet_v2", alpha=0.35,
        image_size=96, mode="frozen", weights="imagenet",
    )
    offline = {"KERAS_HOME": str(tmp_path / "empty_home"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = launch(*tiny_flags(config), env=offline)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(
        "error: --weights=imagenet: could not get the mobilenet_v2 imagenet weights"
    ), result.stderr[-2000:]
    assert IMAGENET_FILE in error[0] and str(tmp_path / "empty_home" / "models") in error[0]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run"), "a failed start wrote into the run dir"


@pytest.mark.slow
def test_export_writes_a_saved_model_that_serves_raw_images_of_any_size(data_dir, pretrained_run, tmp_path):
    import keras
    import tensorflow as tf

    run = str(tmp_path / "run")
    shutil.copytree(pretrained_run, run)
    result = launch(*tiny_flags(tiny_config(data_dir=data_dir, model_dir=run)), "--job=export")
    assert result.returncode == 0, result.stderr[-2000:]
    served = tf.saved_model.load(os.path.join(run, "saved_model"))
    model = keras.saving.load_model(os.path.join(run, "model.keras"))
    rng = np.random.default_rng(0)
    for shape in [(2, 32, 32, 1), (3, 45, 29, 1)]:
        images = rng.integers(0, 256, shape, dtype="uint8")
        np.testing.assert_allclose(served.serve(tf.constant(images)), model(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("job", ["export", "predict"])
def test_export_and_predict_need_a_trained_run(data_dir, tmp_path, job):
    run = str(tmp_path)
    status, stderr = launch_in_process(f"--model_dir={run}", f"--job={job}", f"--inputs={ROOT}")
    assert (status, stderr) == (2, f"error: --model_dir={run}: has no flags.txt: not a run directory (train it first)\n")
    with open(os.path.join(run, "flags.txt"), "w") as f:  # A run stopped before its end: no model yet.
        f.write(tiny_config(data_dir=data_dir, model_dir=run).to_flagfile())
    status, stderr = launch_in_process(f"--model_dir={run}", f"--job={job}", f"--inputs={ROOT}")
    assert (status, stderr) == (2, f"error: --model_dir={run}: has no model.keras (train it first)\n")


MOCKED_LAUNCH = """
import sys
import tensorflow_datasets as tfds
from absl import app
from transfer_engine import launch
from transfer_engine.data import sources
sources._unreachable = lambda urls: None  # The mock stands in for the download: nothing to probe.
with tfds.testing.mock_data(num_examples=40):
    app.run(launch.main, argv=["launch.py", *sys.argv[1:]], flags_parser=launch.parse_flags)
"""


@pytest.mark.slow
def test_cats_vs_dogs_runs_end_to_end_through_launch_on_mocked_tfds(tmp_path):
    """The tutorials' dataset and 80/10/10 split, offline: TFDS' mock serves random images of random
    sizes (and ignores the percent slicing, so every split holds its 40 examples)."""
    import subprocess
    import sys

    model_dir = str(tmp_path / "cats_vs_dogs")
    args = [
        f"--model_dir={model_dir}", "--dataset=cats_vs_dogs", "--backbone=small_cnn", "--image_size=32",
        "--mode=scratch", "--train_split=train[:80%]", "--eval_split=train[80%:90%]",
        "--test_split=train[90%:]", "--batch_size=8", "--epochs=2", "--augment=flip_crop",
    ]
    result = subprocess.run([sys.executable, "-c", MOCKED_LAUNCH, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_json(os.path.join(model_dir, "results.json"))
    assert results["dataset"] == "cats_vs_dogs" and results["class_names"] == ["cat", "dog"]
    assert results["test_examples"] == 40 and results["global_step"] == 2 * (40 // 8)
    assert results["trainable_params"] == 28_768 + 64 + 1, "two classes take one logit"
    assert results["skipped_examples"] == {"train": 0, "eval": 0, "test": 0}


@pytest.mark.slow
def test_a_folder_dataset_skips_and_counts_a_corrupt_image(tmp_path):
    from test_data import _write_folder

    folder = tmp_path / "images"
    _write_folder(folder, per_class=8, corrupt="cat")
    model_dir = str(tmp_path / "run")
    result = launch(
        f"--model_dir={model_dir}", f"--dataset=folder:{folder}", "--backbone=small_cnn",
        "--image_size=24", "--mode=scratch", "--train_split=train", "--eval_split=", "--test_split=",
        "--batch_size=4", "--epochs=1", "--cache=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"train: 1 undecodable examples skipped (or above --max_image_pixels=89478485): {folder}/cat/broken.jpg\n" in result.stderr
    results = read_json(os.path.join(model_dir, "results.json"))
    assert results["skipped_examples"] == {"train": 1}
    assert results["global_step"] == 16 // 4


def _record(pathname, level):
    import logging as std_logging

    return std_logging.LogRecord("absl", level, pathname, 1, "a line", (), None)


def test_the_log_keeps_this_projects_info_lines_and_only_libraries_warnings():
    import logging as std_logging

    from transfer_engine import internals

    site = "lib/python3.11/site-packages/tensorflow/python/checkpoint/sharding/sharding_util.py"
    for ours in ("launch.py", "internals.py", "engine/core/loop.py", "data/sources.py", "models/classifier.py"):
        assert internals._from_this_project(_record(os.path.join(ROOT, ours), std_logging.INFO)), ours
    for library in (f"{ROOT}-venv/{site}", f"{ROOT}/venv/{site}", f"{ROOT}/engine-venv/{site}", f"/usr/{site}"):
        assert not internals._from_this_project(_record(library, std_logging.INFO)), library
        assert internals._from_this_project(_record(library, std_logging.WARNING)), library


@pytest.mark.slow
def test_a_tensorflow_warning_is_written_once_with_a_time_stamp():
    script = ("from transfer_engine import internals, launch\nimport tensorflow as tf\n"
              "from absl import app\n"
              "def main(argv):\n"
              "    internals.configure_logging()\n"
              "    tf.get_logger().warning('a warning from TensorFlow')\n"
              "app.run(main)\n")
    written = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    lines = [line for line in written.stderr.splitlines() if "a warning from TensorFlow" in line]
    assert len(lines) == 1 and re.match(r"^\d\d:\d\d:\d\d WARNING a warning from TensorFlow$", lines[0]), lines


def test_verbosity_opens_the_log_to_every_library():
    from absl import logging

    from transfer_engine import internals

    handler = logging.get_absl_handler().python_handler
    try:
        internals.configure_logging(everything=True)
        assert internals._from_this_project not in handler.filters
        internals.configure_logging()
        assert internals._from_this_project in handler.filters and logging.get_verbosity() == logging.INFO
    finally:
        internals.configure_logging()


def test_help_exits_0_and_lists_every_flag_in_its_groups(capsys):
    import re

    from transfer_engine.engine import config as config_lib

    status, _ = launch_in_process("--help")
    assert status == 0
    shown = capsys.readouterr().out
    titles = [f"{title} (docs/{page})" for title, page, _ in config_lib.FLAG_GROUPS]
    assert re.findall(r"^(\S[^\n]*):$", shown, re.M) == titles
    listed = re.findall(r"^  --(\w+)", shown, re.M)
    assert listed == [name for _, _, names in config_lib.FLAG_GROUPS for name in names]
    assert sorted(listed) == sorted(field.name for field in config_lib.dataclasses.fields(config_lib.Config))
    assert "folder:PATH" in shown.split("  --dataset", 1)[1].split("  --data_dir")[0]
