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

from data import sources
from engine import assembly
from helpers import launch_in_process, replace, tiny_flags, train_run
from models import imagenet
from models.classifier import trained_image_size


def _top_losses_by_hand(run_dir, config):
    """The test split's per-example losses, computed by a plain Keras model.keras over the same images."""
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    source = sources.open_source(config)
    from data import pipeline

    examples = pipeline.prepare(source.split(config.test_split, "test_split"), image_size=config.image_size)
    losses = []
    for images, labels in examples.dataset.batch(64):
        logits = model(images, training=False)
        losses += list(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy())
    return np.array(losses)


def test_the_test_s_highest_losses_are_drawn_and_listed_after_training_and_evaluate(tiny, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny(epochs=1)
    results = train_run(config, run_dir)
    listed = results["test_top_losses"]
    assert len(listed) == 16 and (run_dir / "top_losses.png").stat().st_size > 10_000
    expected = _top_losses_by_hand(run_dir, config)
    order = np.argsort(-expected, kind="stable")[:16]
    np.testing.assert_allclose([row["loss"] for row in listed], expected[order], rtol=1e-4)
    assert [row["example"] for row in listed] == [f"{config.test_split}[{index}]" for index in order]
    classes = results["class_names"]
    assert all(row["label"] in classes and row["predicted"] in classes and 0 < row["probability"] <= 1 for row in listed)
    with tf.io.gfile.GFile(str(run_dir / "top_losses.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    (run_dir / "top_losses.png").unlink()
    status, stderr = launch_in_process("--job=evaluate", f"--model_dir={run_dir}", f"--data_dir={config.data_dir}")
    assert status == 0, stderr
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert [row["example"] for row in evaluation["test_top_losses"]] == [row["example"] for row in listed]
    assert (run_dir / "top_losses.png").exists()


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
    for name, count in (("many", 30), ("few", 6)):
        (tmp_path / name).mkdir()
        for index in range(count):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            (tmp_path / name / f"{index}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    config = tiny(dataset=f"folder:{tmp_path}", label_subset=(), train_split="train", eval_split="", test_split="",
                  model_dir=str(tmp_path / "run"))
    with caplog.at_level("INFO"):
        assembly.build(config)
    assert "train: few training images of few (6): a class with fewer than 10" in caplog.text
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
