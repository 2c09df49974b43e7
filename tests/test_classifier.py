"""models/backbones.py and models/classifier.py: architecture, preprocessing, head, saving, weights."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from transfer_engine.errors import ConfigError
from transfer_engine.models.architectures import ARCHITECTURES
from transfer_engine.models.backbones import BACKBONES
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier, load_backbone_weights, preprocessing


def small(num_classes=3, channels=1, **kwargs):
    return build_classifier(
        backbone="small_cnn", image_size=32, channels=channels, num_classes=num_classes, **kwargs
    )


def test_small_cnn_is_three_conv_bn_relu_pool_blocks_of_32_32_64():
    backbone = BACKBONES["small_cnn"].build((32, 32, 3), None, 1.0)
    kinds = [type(layer).__name__ for layer in backbone.layers[1:]]
    assert kinds == ["Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D"] * 3
    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(conv.filters, conv.kernel_size) for conv in convs] == [(32, (3, 3)), (32, (3, 3)), (64, (3, 3))]
    assert backbone.output_shape == (None, 4, 4, 64)


def test_mobilenet_v2_preprocessing_is_keras_own():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype="uint8")
    expected = keras.applications.mobilenet_v2.preprocess_input(pixels.astype("float32"))
    np.testing.assert_allclose(preprocessing("mobilenet_v2", 8, 3)(pixels), expected, rtol=1e-6)


def test_grayscale_is_repeated_to_three_channels_and_resized():
    gray = np.arange(16, dtype="uint8").reshape(1, 4, 4, 1)
    out = np.asarray(preprocessing("small_cnn", 4, 1)(gray))
    assert out.shape == (1, 4, 4, 3)
    for channel in range(3):
        np.testing.assert_allclose(out[..., channel], gray[..., 0] / 255.0, rtol=1e-6)
    assert preprocessing("small_cnn", 8, 1)(gray).shape == (1, 8, 8, 3)


@pytest.mark.parametrize("backbone", ["small_cnn", "mobilenet_v2"])
def test_called_without_training_the_classifier_runs_inference(backbone):
    """model(x) must not run BatchNorm on the batch's statistics: Keras' image layers (Resizing) default
    to training=True and pass it on to every layer after them."""
    alpha = 0.35 if ARCHITECTURES[backbone].has_alpha else 1.0
    model = build_classifier(backbone=backbone, image_size=32, channels=1, num_classes=3, alpha=alpha)
    for variable in model.non_trainable_variables:  # Moving statistics far from any batch's.
        if "moving_mean" in variable.path or "moving_variance" in variable.path:
            variable.assign(np.full(variable.shape, 3.0, "float32"))
    before = [variable.numpy() for variable in model.weights]
    images = np.random.default_rng(0).integers(0, 256, (4, 45, 29, 1), dtype="uint8")
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(model(images), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(images, training=False), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(images[:1]), expected[:1], rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.weights)), "a call moved a weight"


def test_two_classes_get_one_logit_more_get_one_each():
    assert small(num_classes=2).output_shape == (None, 1)
    assert small(num_classes=5).output_shape == (None, 5)


def test_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = small()
    assert model.get_layer(BACKBONE_LAYER).layers[1].compute_dtype == "float16"
    assert model(np.zeros((2, 32, 32, 1), "uint8")).dtype == "float32"


@pytest.mark.slow
def test_saved_model_loads_in_plain_keras_and_takes_raw_uint8_images_of_any_size(tmp_path):
    """model.keras holds its preprocessing in Keras' own layers and ops: it loads and predicts in a
    Python that cannot import this project."""
    model = small(dropout=0.1)
    path = tmp_path / "model.keras"
    model.save(path)
    rng = np.random.default_rng(1)
    same = rng.integers(0, 256, (3, 32, 32, 1), dtype="uint8")
    bigger = rng.integers(0, 256, (2, 57, 41, 1), dtype="uint8")
    np.save(tmp_path / "same.npy", same)
    np.save(tmp_path / "bigger.npy", bigger)
    script = (
        "import numpy as np, keras; m = keras.saving.load_model('model.keras'); "
        "np.save('same_out.npy', np.asarray(m(np.load('same.npy')))); "
        "np.save('bigger_out.npy', np.asarray(m(np.load('bigger.npy'))))"
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "same_out.npy"), model(same), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "bigger_out.npy"), model(bigger), rtol=1e-5, atol=1e-6)
    assert np.load(tmp_path / "bigger_out.npy").shape == (2, 3)


def _backbone_weights(model):
    return [w.numpy() for w in model.get_layer(BACKBONE_LAYER).weights]


@pytest.mark.parametrize("form", ["weights.h5", "keras", "run_dir"])
def test_backbone_weights_load_from_a_file_or_a_run_and_the_head_stays_new(tmp_path, form):
    keras.utils.set_random_seed(1)
    donor = small(num_classes=5)
    if form == "weights.h5":
        source = str(tmp_path / "backbone.weights.h5")
        donor.get_layer(BACKBONE_LAYER).save_weights(source)
    else:
        source = str(tmp_path / "model.keras")
        donor.save(source)
        if form == "run_dir":
            source = str(tmp_path)
    keras.utils.set_random_seed(2)
    model = small(num_classes=3)
    head_before = model.get_layer("logits").get_weights()
    load_backbone_weights(model, source)
    for got, expected in zip(_backbone_weights(model), _backbone_weights(donor)):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(model.get_layer("logits").get_weights(), head_before):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("suffix", ["weights.h5", "keras"])
def test_weights_of_another_architecture_fail_with_one_line(tmp_path, suffix):
    other = build_classifier(backbone="mobilenet_v2", image_size=32, channels=3, num_classes=3, alpha=0.35)
    path = str(tmp_path / f"other.{suffix}")
    if suffix == "keras":
        other.save(path)
    else:
        other.get_layer(BACKBONE_LAYER).save_weights(path)
    with pytest.raises(ConfigError) as raised:
        load_backbone_weights(small(), path)
    message = str(raised.value)
    assert message.startswith(f"--weights={path}: does not fit this backbone"), message
    assert "\n" not in message


def test_a_directory_without_a_finished_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory without a finished run.s weights"):
        load_backbone_weights(small(), str(tmp_path))


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(ConfigError, match=r"^--weights=imagenet: small_cnn has no imagenet weights$"):
        small(weights="imagenet")
