"""What a run hands over: model.keras and its exports in inference mode (checked in a Python process that
cannot import this project), --job=export's artifacts and parity report, and --job=predict."""

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.engine.jobs import export
from transfer_engine.engine.core.run_dir import RunDir
from helpers import ROOT, launch_in_process, train_run

# Run in a fresh interpreter with this project's modules blocked (an editable install would find them):
# model.keras and the SavedModel must stand alone. Prints what it measured as JSON.
STANDALONE_CHECK = r"""
import importlib.abc, json, sys
PROJECT = {"transfer_engine", "engine", "models", "data", "launch", "errors", "internals"}

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"{name} is this project's, blocked")

sys.meta_path.insert(0, Blocked())
sys.path = [p for p in sys.path if p not in ("", ".", sys.argv[1])]
try:
    import transfer_engine  # noqa
    raise SystemExit("this project is importable")
except ImportError:
    pass
import keras, numpy as np, tensorflow as tf

rng = np.random.default_rng(0)
report = {}
for run in sys.argv[2:]:
    model = keras.saving.load_model(f"{run}/model.keras")
    channels = model.input.shape[-1]
    images = rng.integers(0, 256, (4, 123, 77, channels), dtype="uint8")
    others = rng.integers(0, 256, (5, 123, 77, channels), dtype="uint8")
    weights = [w.numpy() for w in model.weights]
    predicted = model.predict(images, verbose=0)
    called, inference = np.asarray(model(images)), np.asarray(model(images, training=False))
    keras_moved = any(not np.array_equal(a, b.numpy()) for a, b in zip(weights, model.weights))
    served = tf.saved_model.load(f"{run}/saved_model")
    state = [v.numpy() for v in served.variables]
    alone = served.serve(tf.constant(images)).numpy()
    mixed = served.serve(tf.constant(np.concatenate([images[:1], others]))).numpy()[:1]
    served_moved = any(not np.array_equal(a, v.numpy()) for a, v in zip(state, served.variables))
    report[run] = {
        "call_vs_predict": float(np.abs(called - predicted).max()),
        "inference_vs_predict": float(np.abs(inference - predicted).max()),
        "serve_vs_predict": float(np.abs(alone - predicted).max()),
        "serve_close": bool(np.allclose(alone, predicted, rtol=1e-5, atol=1e-6)),
        "batch_dependence": float(np.abs(mixed - alone[:1]).max()),
        "keras_moved": keras_moved, "served_moved": served_moved, "variables": len(state),
    }
print(json.dumps(report))
"""

@pytest.mark.slow
def test_every_mode_hands_over_inference_mode_artifacts_that_need_no_project(mode_runs, tmp_path):
    """Each mode's run of the session's compare (BatchNorm training where the backbone trains, dropout),
    copied: its SavedModel is written into the copy."""
    runs = []
    for mode in ("scratch", "frozen", "finetune", "staged", "lora"):
        run = tmp_path / mode
        shutil.copytree(os.path.join(mode_runs, mode), run)
        export.write_saved_model(export.load_model(RunDir(str(run))), str(run / "saved_model"))
        runs.append(str(run))
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_CHECK, ROOT, *runs], cwd=str(tmp_path), capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for run in runs:
        measured = report[run]
        assert measured["call_vs_predict"] <= 1e-5 and measured["inference_vs_predict"] <= 1e-5, (run, measured)
        assert measured["serve_close"], (run, measured)  # serve(a) == predict(a), rtol 1e-5.
        assert measured["batch_dependence"] <= 1e-5, (run, measured)
        assert not measured["keras_moved"] and not measured["served_moved"], (run, measured)
        assert measured["variables"] > 0


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def scratch_run(tiny, tmp_path):
    """A tiny scratch run: BatchNorm trained, so inference and training mode differ."""
    run = tmp_path / "run"
    train_run(tiny(mode="scratch", train_split="train[:2%]", test_split="test[:120]"), run)
    return str(run)


@pytest.mark.slow
def test_export_writes_three_formats_and_a_parity_report(scratch_run):
    status, stderr = launch_in_process(
        f"--model_dir={scratch_run}", "--job=export", "--export_format=saved_model,litert,litert_int8"
    )
    assert status == 0, stderr
    report = read_json(os.path.join(scratch_run, "export.json"))
    results = read_json(os.path.join(scratch_run, "results.json"))
    assert report["test_examples"] == results["test_examples"]
    assert report["keras_test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert report["temperature"] == results["calibration"]["temperature"] != 1.0
    rows = {row["format"]: row for row in report["artifacts"]}
    assert list(rows) == ["saved_model", "litert", "litert_int8"]
    for name in ("saved_model", "litert"):
        assert rows[name]["within_rounding"] and rows[name]["agreement"] == 1.0, rows[name]
        assert rows[name]["test_accuracy"] == report["keras_test_accuracy"]
    assert rows["litert_int8"]["agreement"] >= 0.9, rows["litert_int8"]
    assert rows["litert_int8"]["bytes"] <= 0.4 * rows["litert"]["bytes"]
    # Per class, by the run's class names (each has test images here; JSON sorts them): the float files as Keras.
    names = sorted(results["class_names"])
    assert list(report["keras_class_accuracy"]) == list(report["class_examples"]) == names
    assert sum(report["class_examples"].values()) == report["test_examples"]
    for name, row in rows.items():
        assert list(row["class_accuracy"]) == names, row
        for drop in row["class_drops"]:
            assert 100 * drop["drop"] > report["max_class_drop"] and drop["accuracy"] == row["class_accuracy"][drop["class"]]
    for name in ("saved_model", "litert"):
        assert rows[name]["class_accuracy"] == report["keras_class_accuracy"] and rows[name]["class_drops"] == []
    for row in rows.values():
        assert os.path.exists(row["path"]) and row["bytes"] > 0
    assert not [name for name in os.listdir(scratch_run) if name.startswith(".partial-")], "a temporary was left"
    assert report["input"]["channels"] == results["input"]["channels"] == 1
    # The SavedModel takes RGB (and RGBA) images too, converted as training converts them.
    import keras

    rgb = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    loaded = tf.saved_model.load(os.path.join(scratch_run, "saved_model"))  # Its variables live as long as it does.
    served = loaded.serve
    model = keras.saving.load_model(os.path.join(scratch_run, "model.keras"))
    expected = model(tf.image.rgb_to_grayscale(rgb), training=False).numpy()
    np.testing.assert_allclose(served(tf.constant(rgb)).numpy(), expected, atol=1e-5)
    rgba = np.concatenate([rgb, np.full((2, 40, 40, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(served(tf.constant(rgba)).numpy(), served(tf.constant(rgb)).numpy())


@pytest.mark.slow  # Trains for several seconds: the fast tier stays within a minute.
def test_export_fails_when_a_float_artifact_does_not_compute_what_was_trained(scratch_run, monkeypatch):
    """The parity check catches the bug it exists for: a SavedModel serving BatchNorm in training mode."""
    import keras

    def training_mode_saved_model(model, path, **_):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda images: model(images, training=True),
                             input_signature=[export.input_spec(model)])
        archive.write_out(path, verbose=False)

    monkeypatch.setitem(export.WRITERS, "saved_model", training_mode_saved_model)
    status, stderr = launch_in_process(f"--model_dir={scratch_run}", "--job=export")
    assert status == 1
    assert stderr.startswith("error: saved_model (") and "differs from the Keras model by up to" in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    row = read_json(os.path.join(scratch_run, "export.json"))["artifacts"][0]
    assert row["within_rounding"] is False and row["max_logit_diff"] > row["tolerance"]


@pytest.mark.slow
def test_an_int8_file_that_loses_classes_is_a_warning_naming_them_and_the_export_succeeds(
        pretrained_run, tmp_path, monkeypatch, caplog):
    """The per-class check through --job=export: an int8 file planted to predict class 1 for every image
    loses each other class the Keras model gets right; a warning names them, worst first, export.json has
    them, and the export still exits 0."""
    run = str(tmp_path / "run")
    shutil.copytree(pretrained_run, run)
    real_runner = export.runner

    def collapsed_runner(name, path):
        run_file = real_runner(name, path)

        def run_collapsed(images):
            logits = run_file(images)
            logits[:, 1] = logits.max(-1) + 1.0
            return logits

        return run_collapsed

    monkeypatch.setattr(export, "runner", collapsed_runner)
    status, stderr = launch_in_process(f"--model_dir={run}", "--job=export", "--export_format=litert_int8",
                                       "--max_class_drop=5")
    assert status == 0, stderr
    report = read_json(os.path.join(run, "export.json"))
    (row,) = report["artifacts"]
    names = read_json(os.path.join(run, "results.json"))["class_names"]
    keras_accuracy = report["keras_class_accuracy"]
    assert row["class_accuracy"] == {name: float(index == 1) for index, name in enumerate(names)}
    lost = sorted((name for name in names[::2] if keras_accuracy[name] > 0.05), key=lambda name: -keras_accuracy[name])
    assert lost, keras_accuracy  # The Keras model gets some images of class 0 or 2 right.
    assert [drop["class"] for drop in row["class_drops"]] == lost
    for drop in row["class_drops"]:
        assert drop == {"class": drop["class"], "keras_accuracy": keras_accuracy[drop["class"]], "accuracy": 0.0,
                        "drop": pytest.approx(keras_accuracy[drop["class"]], abs=1e-9),
                        "examples": report["class_examples"][drop["class"]]}
    warnings = [record.getMessage() for record in caplog.records if "against the Keras model" in record.getMessage()]
    assert warnings == [export.drop_warning(row, 5.0)], warnings
    assert warnings[0].startswith(f"litert_int8: {len(lost)} class")
    # --max_class_drop is the export's: at 100 points no loss is more than it.
    status, stderr = launch_in_process(f"--model_dir={run}", "--job=export", "--export_format=litert_int8",
                                       "--max_class_drop=100")
    assert status == 0, stderr
    report = read_json(os.path.join(run, "export.json"))
    assert report["max_class_drop"] == 100 and report["artifacts"][0]["class_drops"] == []
    assert report["artifacts"][0]["class_accuracy"] == row["class_accuracy"]  # As collapsed as before.


def write_images(folder):
    """A folder of mixed images: sizes, formats, channel counts, a nested one, an unreadable one."""
    from PIL import Image

    rng = np.random.default_rng(3)
    os.makedirs(folder / "nested" / "deeper")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "rgb.bmp")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(folder / "RGBA.PNG")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "nested" / "first.gif")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "nested" / "deeper" / "x.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("not an image, not looked at")
    return ["RGBA.PNG", "gray.png", "nested/deeper/x.jpg", "nested/first.gif", "rgb.bmp"]


def test_predict_searches_a_folder_for_the_images_a_folder_dataset_reads(tmp_path):
    from transfer_engine.data import sources
    from transfer_engine.engine.jobs.predict import find_images

    for path in ("cat/0.jpg", "cat/2019/1.PNG", "dog/0.gif", "dog/notes.txt", "cat/.DS_Store", "dog/._0.gif",
                 ".ipynb_checkpoints/cat-checkpoint.jpg", "cat/.ipynb_checkpoints/0-checkpoint.jpg"):
        os.makedirs((tmp_path / path).parent, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    found = find_images([str(tmp_path)])
    assert [os.path.relpath(path, tmp_path) for path in found] == ["cat/0.jpg", "cat/2019/1.PNG", "dog/0.gif"]
    assert sorted(found) == sorted(sources.FolderSource(str(tmp_path), label_subset=()).paths)


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_predict_writes_one_row_per_readable_image_with_the_models_top_classes(data_dir, pretrained_run, tmp_path, tta):
    import keras
    import tensorflow as tf

    folder = tmp_path / "images"
    readable = write_images(folder)
    output = tmp_path / "out" / "predictions.csv"
    os.makedirs(output.parent)
    run = str(tmp_path / "run")
    shutil.copytree(pretrained_run, run)
    status, stderr = launch_in_process("--job=predict", f"--model_dir={run}", f"--inputs={folder}",
                                       f"--output={output}", "--top_k=2", "--batch_size=2", f"--tta={tta}")
    assert status == 0, stderr
    with open(output) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label", "probability", "label_2", "probability_2"]
    assert [os.path.relpath(row[0], folder) for row in rows[1:]] == readable

    model = keras.saving.load_model(os.path.join(run, "model.keras"))
    results = read_json(os.path.join(run, "results.json"))
    names, temperature = results["class_names"], results["calibration"]["temperature"]
    assert temperature != 1.0  # Predict's probabilities are the calibrated ones: softmax(logits / temperature).
    for row in rows[1:]:
        image = tf.io.decode_image(open(row[0], "rb").read(), expand_animations=False).numpy()
        image = image[..., :3] if image.shape[-1] == 4 else image
        if image.shape[-1] == 3:
            image = tf.image.rgb_to_grayscale(image).numpy()
        logits = model.predict(image[None], verbose=0)
        if tta:  # The mean with the mirror image's logits.
            logits = (logits + model.predict(image[None, :, ::-1], verbose=0)) / 2
        probabilities = keras.ops.softmax(logits / temperature).numpy()[0]
        best, second = np.argsort(-probabilities)[:2]
        assert row[1] == names[best] and row[3] == names[second], row
        assert float(row[2]) == pytest.approx(probabilities[best], abs=1e-5)
        assert float(row[4]) == pytest.approx(probabilities[second], abs=1e-5)


def test_predict_where_no_input_decodes_is_one_line_exit_2_and_keeps_the_earlier_csv(pretrained_run, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    output = tmp_path / "predictions.csv"
    output.write_text("path,label,probability\nearlier.png,Shirt,0.9\n")
    status, stderr = launch_in_process("--job=predict", f"--model_dir={pretrained_run}",
                                       f"--inputs={tmp_path / 'broken.jpg'},{tmp_path / 'empty.png'}", f"--output={output}")
    assert status == 2, stderr
    assert stderr.strip().splitlines()[-1].endswith(": none of the 2 files decodes as an image: "
                                                    f"{tmp_path / 'broken.jpg'}, {tmp_path / 'empty.png'}")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert output.read_text() == "path,label,probability\nearlier.png,Shirt,0.9\n"


@pytest.mark.slow
def test_litert_files_carry_labels_that_mediapipes_image_classifier_reads_and_agrees_with(tiny, tmp_path):
    """MediaPipe Tasks runs the exported files as they are (their TFLite metadata: labels, raw pixels in)."""
    pytest.importorskip("mediapipe")
    from PIL import Image

    rng = np.random.default_rng(5)  # Three colours a small CNN tells apart, with noise.
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():
        os.makedirs(tmp_path / "images" / name)
        for index in range(24):
            noisy = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(tmp_path / "images" / name / f"{index}.png")
    run = tmp_path / "run"
    config = tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=(), train_split="train[:70%]",
                  eval_split="train[70%:80%]", test_split="train[80%:]", epochs=3, batch_size=8)
    train_run(config, run)
    status, stderr = launch_in_process(f"--model_dir={run}", "--job=export", "--export_format=litert,litert_int8")
    assert status == 0, stderr
    rows = {row["format"]: row for row in read_json(os.path.join(run, "export.json"))["artifacts"]}
    for name in ("litert", "litert_int8"):
        assert rows[name]["mediapipe_agreement"] == rows[name]["agreement"], rows[name]
        with zipfile.ZipFile(rows[name]["path"]) as packed:  # The labels: an associated file, zipped onto it.
            assert packed.read("labels.txt").decode().split() == ["blue", "green", "red"]
    assert rows["litert"]["mediapipe_agreement"] == 1.0
