"""Every backbone in the registry, at 32 px: preprocessing, what trains, imagenet from the cache,
weights of another architecture."""

import hashlib
import re

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.applications import efficientnet, mobilenet_v3, resnet
from keras.src.backend import config as keras_config
from keras.src.legacy.saving import legacy_h5_format  # The format of Keras' published weight files.

from transfer_engine.errors import ConfigError
from transfer_engine.engine.core.optimizer import make_optimizer
from transfer_engine.engine.core.steps import Trainer
from transfer_engine.models import trainability
from transfer_engine.models.architectures import ARCHITECTURES
from transfer_engine.models.backbones import BACKBONES
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier, load_backbone_weights, preprocessing

SIZE = 32
APPLICATIONS = [name for name, facts in ARCHITECTURES.items() if facts.has_imagenet_weights]
CONVERTED = ["efficientnet_lite0"]  # ImageNet weights from a package, converted (tests/test_imagenet.py).
DOWNLOADED = [name for name in APPLICATIONS if name not in CONVERTED]  # By Keras, into its cache.
# Keras checks these files against its own hashes: (module registry, key) per backbone.
HASHED = {
    "mobilenet_v3_small": (mobilenet_v3.WEIGHTS_HASHES, "small_224_1.0_float"),
    "resnet50": (resnet.WEIGHTS_HASHES, "resnet50"),
    "efficientnet_b0": (efficientnet.WEIGHTS_HASHES, "b0"),
}
KERAS_OWN = {
    "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
    "mobilenet_v3_small": keras.applications.mobilenet_v3.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "efficientnet_b0": keras.applications.efficientnet.preprocess_input,
}


def test_every_application_backbone_is_checked_against_keras():
    assert sorted(KERAS_OWN) == sorted(DOWNLOADED)
    assert sorted(BACKBONES) == sorted(APPLICATIONS + ["small_cnn"])


@pytest.mark.parametrize("name", DOWNLOADED)
def test_preprocessing_is_keras_applications_own(name):
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype="uint8")
    expected = KERAS_OWN[name](pixels.astype("float32"))
    np.testing.assert_allclose(preprocessing(name, SIZE, 3)(pixels), expected, rtol=1e-6, atol=1e-6)
    gray = pixels[..., :1]
    np.testing.assert_allclose(
        preprocessing(name, SIZE, 1)(gray), KERAS_OWN[name](np.repeat(gray, 3, axis=-1).astype("float32")),
        rtol=1e-6, atol=1e-6,
    )


def test_resnet50_gets_caffe_bgr_mean_subtraction_not_unit_pixels():
    white = np.full((1, 2, 2, 3), 255, "uint8")
    out = np.asarray(preprocessing("resnet50", 2, 3)(white))[0, 0, 0]
    np.testing.assert_allclose(out, [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-6)


def _train(model, variables, steps=2):
    """A few SGD steps through the engine's Trainer on random images (default strategy)."""
    strategy = tf.distribute.get_strategy()
    optimizer = make_optimizer(name="sgd", learning_rate=0.05, weight_decay=0.0, precision="float32",
                               variables=variables)
    images = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype="uint8")
    data = tf.data.Dataset.from_tensors((images, np.array([0, 1, 2, 1]))).repeat()
    iterator = iter(strategy.distribute_datasets_from_function(lambda context: data))
    Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=4,
            variables=variables).train_steps(iterator, tf.constant(steps))


def _changed_layers(backbone, before):
    return [layer.name for layer in trainability.weighted_layers(backbone)
            if any(not np.array_equal(before[w.path], w.numpy()) for w in layer.weights)]


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def model(request):
    keras.utils.set_random_seed(0)
    return build_classifier(backbone=request.param, image_size=SIZE, channels=3, num_classes=3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, bn", [("frozen", "frozen"), ("finetune", "train"), ("finetune", "frozen")]
)
def test_training_changes_exactly_what_the_rule_says(model, mode, bn):
    backbone = model.get_layer(BACKBONE_LAYER)
    variables = trainability.apply(model, mode=mode, rule=trainability.Rule(unfreeze=3), bn=bn)
    before = trainability.snapshot(model)
    _train(model, variables)
    top = [layer.name for layer in trainability.weighted_layers(backbone)[-3:]] if mode == "finetune" else []
    if bn == "frozen":
        top = [name for name in top if not isinstance(backbone.get_layer(name), keras.layers.BatchNormalization)]
    assert _changed_layers(backbone, before) == top
    assert trainability.audit(model, before, variables)["frozen_changed"] == 0
    head = model.get_layer("logits").weights
    assert any(not np.array_equal(before[w.path], w.numpy()) for w in head), "the head did not train"


def test_efficientnet_lite0_scales_pixels_as_its_weights_expect():
    """(pixel - 127) / 128 before the stem convolution, in a backbone built with or without weights."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype="uint8")
    model = build_classifier(backbone="efficientnet_lite0", image_size=SIZE, channels=3, num_classes=3)
    backbone = model.get_layer(BACKBONE_LAYER)
    scaled = keras.Model(backbone.input, backbone.get_layer("stem_conv_pad").input)
    inputs = preprocessing("efficientnet_lite0", SIZE, 3)(pixels)
    np.testing.assert_allclose(scaled(inputs), (pixels.astype("float32") - 127) / 128, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", DOWNLOADED)
def test_imagenet_weights_load_from_a_preseeded_keras_cache(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # Keras read KERAS_HOME at import.
    for variable in ("https_proxy", "HTTPS_PROXY"):  # No network, even where CI has one.
        monkeypatch.setenv(variable, "http://127.0.0.1:9")

    with pytest.raises(ConfigError) as raised:  # Empty cache: one line saying what to put where.
        build_classifier(backbone=name, image_size=SIZE, channels=3, num_classes=2, weights="imagenet")
    message = str(raised.value)
    assert message.startswith(f"--weights=imagenet: could not get the {name} imagenet weights")
    assert str(tmp_path / "models") in message and "\n" not in message
    file_name = re.search(r"https://\S+/([^/\s]+\.h5)", message).group(1)

    keras.utils.set_random_seed(3)  # Stand-in for the published file: same architecture, Keras' format.
    published = BACKBONES[name].build((SIZE, SIZE, 3), None, 1.0)
    path = tmp_path / "models" / file_name
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, published)
    if name in HASHED:  # Register the stand-in's hash where Keras verifies the published one's.
        registry, key = HASHED[name]
        monkeypatch.setitem(registry, key, (registry[key][0], hashlib.sha256(path.read_bytes()).hexdigest()))

    model = build_classifier(backbone=name, image_size=SIZE, channels=3, num_classes=2, weights="imagenet")
    loaded = model.get_layer(BACKBONE_LAYER).weights
    assert len(loaded) == len(published.weights)
    for got, expected in zip(loaded, published.weights):
        np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=got.path)


@pytest.mark.slow
@pytest.mark.parametrize("name", APPLICATIONS)
def test_weights_of_another_architecture_give_one_line(name, tmp_path):
    path = str(tmp_path / "small_cnn.weights.h5")
    build_classifier(backbone="small_cnn", image_size=SIZE, channels=3, num_classes=2).get_layer(
        BACKBONE_LAYER
    ).save_weights(path)
    model = build_classifier(backbone=name, image_size=SIZE, channels=3, num_classes=2)
    with pytest.raises(ConfigError) as raised:
        load_backbone_weights(model, path)
    assert str(raised.value).startswith(f"--weights={path}: does not fit this backbone: ")
    assert "\n" not in str(raised.value)
