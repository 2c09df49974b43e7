"""The own-photos path (issue 24): top_losses.png after the test and --job=evaluate, the warnings a user
needs on that path (image size unlike the weights', classes with few images), and EfficientNet-Lite0 with
ImageNet weights training every mode on a folder of JPEG photos of mixed sizes."""

import json
import os

import keras
import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from transfer_engine.data import sources
from transfer_engine.engine.core import assembly
from transfer_engine.engine.core.assembly import trained_image_size
from helpers import launch_in_process, replace, tiny_flags, train_run
from transfer_engine.models import imagenet


def _by_hand(run_dir, config, *, tta):
    """(losses, logits, labels) of the test split, computed by a plain Keras model.keras over the same
    images (with --tta, the mean of each image's and its mirror image's logits)."""
    from transfer_engine.data import pipeline

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    source = sources.open_source(config)
    examples = pipeline.prepare(source.split(config.test_split, "test_split"), image_size=config.image_size)
    all_logits, all_labels = [], []
    for images, labels in examples.dataset.batch(64):
        logits = model(images, training=False)
        if tta:
            logits = (logits + model(tf.image.flip_left_right(images), training=False)) / 2
        all_logits.append(np.asarray(logits))
        all_labels.append(labels.numpy())
    logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy()
    return losses, logits, labels


def _check_listed(listed, config, classes, losses, logits, labels):
    order = np.argsort(-losses, kind="stable")[:16]
    assert len(listed) == 16
    np.testing.assert_allclose([row["loss"] for row in listed], losses[order], rtol=1e-4)
    assert [row["example"] for row in listed] == [f"{config.test_split}[{index}]" for index in order]
    probabilities = keras.ops.softmax(logits).numpy()
    for row, index in zip(listed, order):
        assert row["label"] == classes[labels[index]]
        assert row["predicted"] == classes[int(np.argmax(logits[index]))]
        assert row["probability"] == pytest.approx(float(probabilities[index].max()), rel=1e-4)


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_the_test_s_highest_losses_are_drawn_and_listed_after_training_and_evaluate(tiny, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny(epochs=1, tta=True)
    results = train_run(config, run_dir)
    classes = results["class_names"]
    _check_listed(results["test_top_losses"], config, classes, *_by_hand(run_dir, config, tta=True))
    with open(run_dir / "top_losses.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "top_losses.png").stat().st_size > 10_000

    (run_dir / "top_losses.png").unlink()
    status, stderr = launch_in_process("--job=evaluate", f"--model_dir={run_dir}", f"--data_dir={config.data_dir}",
                                       "--tta=false")
    assert status == 0, stderr
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    _check_listed(evaluation["test_top_losses"], config, classes, *_by_hand(run_dir, config, tta=False))
    assert (run_dir / "top_losses.png").exists()


def test_each_picture_is_titled_with_its_true_and_predicted_class():
    from transfer_engine.engine.reports import top_losses

    mistakes = [top_losses.Mistake(index=4, loss=1.234, label=0, predicted=1, probability=0.8),
                top_losses.Mistake(index=2, loss=0.1, label=1, predicted=1, probability=0.9)]
    pictures = {4: np.zeros((8, 8, 3), np.uint8), 2: np.zeros((8, 8, 1), np.uint8)}
    drawing = top_losses.figure(mistakes, pictures, ("cat", "dog"), names={4: "/x/cat/a.jpg", 2: "/x/dog/b.jpg"},
                                title="t")
    titles = [axis.get_title() for axis in drawing.axes if axis.get_title()]
    assert titles == ["true cat\npredicted dog (0.80)\nloss 1.23\na.jpg", "true dog\npredicted dog (0.90)\nloss 0.10\nb.jpg"]


def _folder(root, counts, broken=None):
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            (root / name / f"{index}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    if broken:
        (root / broken / "broken.png").write_bytes(b"not a png")


@pytest.mark.parametrize("broken", [None, "dog"])
def test_top_losses_name_files_only_where_the_names_are_exact(tiny, tmp_path, broken):
    """Names follow the split as read; an undecodable image shifts the decoded ones, so then only positions."""
    from transfer_engine.engine.reports import predictions
    from transfer_engine.engine import reports
    from transfer_engine.engine.core.run_dir import RunDir
    from transfer_engine.engine.core.steps import Stages

    _folder(tmp_path / "photos", {"cat": 12, "dog": 12}, broken=broken)
    config = tiny(dataset=f"folder:{tmp_path / 'photos'}", label_subset=(), train_split="train", eval_split="",
                  test_split="train", model_dir=str(tmp_path / "run"))
    run = assembly.build(config)
    os.makedirs(config.model_dir)
    test = predictions.predict(run, Stages(run)(0), "test")
    listed = reports.highest_losses(reports.Finished(run, RunDir(config.model_dir), {"eval": None, "test": test},
                                                     step=0))["test_top_losses"]
    assert len(listed) == 16
    if broken:
        assert all(isinstance(row["example"], int) for row in listed)
    else:
        assert all(os.path.basename(os.path.dirname(row["example"])) == row["label"] for row in listed)


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_weights_trained_at_another_image_size_are_warned_about(tiny, pretrained_run, tmp_path, caplog):
    assert trained_image_size("imagenet", "efficientnet_lite0") == 224
    assert trained_image_size(pretrained_run, "small_cnn") == 32
    assert trained_image_size(os.path.join(pretrained_run, "backbone.weights.h5"), "small_cnn") == 32
    assert trained_image_size(str(tmp_path), "small_cnn") is None
    same = tiny(mode="frozen", weights=pretrained_run, model_dir=str(tmp_path / "same"))
    with caplog.at_level("INFO"):
        assembly.build(same)
    assert "were trained at" not in caplog.text
    other = replace(same, image_size=48)
    with caplog.at_level("INFO"):
        assembly.build(other)
    assert f"--image_size=48: the backbone's weights (--weights={pretrained_run}) were trained at 32 px" in caplog.text
    assert "set --image_size=32" in caplog.text


def test_a_class_with_few_training_images_is_warned_about(tiny, tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name, count in (("many", 10), ("few", 9)):
        (tmp_path / name).mkdir()
        for index in range(count):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            (tmp_path / name / f"{index}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    config = tiny(dataset=f"folder:{tmp_path}", label_subset=(), train_split="train", eval_split="", test_split="",
                  model_dir=str(tmp_path / "run"), batch_size=4)
    with caplog.at_level("INFO"):
        assembly.build(config)
    assert "train: few training images of few (9): a class with fewer than 10" in caplog.text
    assert "many (" not in caplog.text


def _photo_folder(root):
    """Three classes of real photos (scikit-image's CC0 ones) as JPEG crops of mixed sizes."""
    rng = np.random.default_rng(0)
    for name, photo in (("cat", skimage.data.chelsea()), ("coffee", skimage.data.coffee()),
                        ("rocket", skimage.data.rocket())):
        (root / name).mkdir(parents=True)
        height, width = photo.shape[:2]
        for index in range(8):
            side = int(rng.integers(min(height, width) // 2, min(height, width)))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = photo[top:top + side, left:left + side + int(rng.integers(0, 40))]
            (root / name / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(crop).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("mode_flags", [
    ("--mode=frozen",), ("--mode=finetune", "--unfreeze=10"), ("--mode=finetune", "--unfreeze=10", "--head_epochs=1"),
    ("--mode=lora", "--lora_rank=2"), ("--mode=scratch",),
])
def test_efficientnet_lite0_with_imagenet_weights_trains_every_mode_on_jpeg_photos(tmp_path, monkeypatch, mode_flags):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    _photo_folder(tmp_path / "photos")
    run = tmp_path / "run"
    status, stderr = launch_in_process(
        "--flagfile=configs/photos.flags", f"--dataset=folder:{tmp_path / 'photos'}", f"--model_dir={run}",
        "--image_size=64", "--epochs=2", "--batch_size=4", "--steps_per_epoch=2", *mode_flags)
    assert status == 0, stderr
    results = json.loads((run / "results.json").read_text())
    assert results["backbone"] == "efficientnet_lite0" and results["test_examples"] == 3
    assert results["trainability_audit"]["frozen_changed"] == 0
    assert os.path.exists(imagenet.cache_path(imagenet.SHA256)) == (mode_flags != ("--mode=scratch",))
