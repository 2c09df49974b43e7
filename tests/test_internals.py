"""internals.py, the one door to library internals: run this file after upgrading Keras, TensorFlow or
TensorFlow Datasets. Each test checks one thing the project relies on against the installed versions."""

import os
import platform
import subprocess
import sys
import urllib.error

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_engine import internals
from transfer_engine.engine.core.optimizer import make_optimizer
from transfer_engine.errors import UnsupportedLibrary
from helpers import ROOT, two_devices
from transfer_engine.models import trainability
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier


def test_the_installed_versions_are_the_checked_ones_and_another_major_is_refused():
    installed = dict(internals._INSTALLED)
    internals.check_versions()
    internals.check_versions({**installed, "keras": "3.99.0"})  # Another minor version is tried.
    with pytest.raises(UnsupportedLibrary) as raised:
        internals.check_versions({**installed, "keras": "4.0.0"})
    assert str(raised.value) == (
        "keras 4.0.0 is installed, but this engine was checked against keras 3.15.1 only: install keras "
        "3.x (pip install 'keras>=3,<4')"
    )
    assert raised.value.exit_status == 2


def _one_step(strategy, *, optimizer, multiplier, precision, weight_decay=0.0, zero_gradients=False):
    """{variable path: change} after one engine-style step of a small classifier whose backbone's
    learning rate is multiplied by `multiplier`, built and stepped under `strategy`."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(5)
    with strategy.scope():
        model = build_classifier(backbone="small_cnn", image_size=16, channels=1, num_classes=3)
        variables = trainability.apply(model, mode="scratch")
        backbone = {id(w) for w in model.get_layer(BACKBONE_LAYER).weights}
        built = make_optimizer(
            name=optimizer, learning_rate=0.01, weight_decay=weight_decay, precision=precision,
            variables=variables, lr_multipliers={id(w): multiplier for w in variables if id(w) in backbone},
        )
    before = {w.path: w.numpy() for w in variables}
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), dtype="uint8")
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1])
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, labels)))

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=False)
            loss = tf.nn.compute_average_loss(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits), global_batch_size=8
            )
            scaled = built.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)
        if zero_gradients:
            gradients = [tf.zeros_like(g) for g in gradients]
        built.apply(gradients, variables)

    tf.function(lambda batch: strategy.run(replica_step, args=batch))(next(iter(data)))
    return {w.path: w.numpy() - before[w.path] for w in variables}, built


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_the_backbone_multiplier_scales_adam_updates_under_mirrored_mixed_precision():
    strategy = two_devices()
    full, optimizer = _one_step(strategy, optimizer="adam", multiplier=1.0, precision="mixed_float16")
    tenth, _ = _one_step(strategy, optimizer="adam", multiplier=0.1, precision="mixed_float16")
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.abs(full["block1_conv/kernel"]).max() > 1e-4, "the step did not move the backbone"
    # Adam's first step is about lr * sign(gradient): the backbone's is a tenth, the head's unchanged.
    np.testing.assert_allclose(tenth["logits/kernel"], full["logits/kernel"], rtol=1e-5, atol=1e-8)
    for path in ("block1_conv/kernel", "block2_bn/gamma", "block3_conv/kernel"):
        np.testing.assert_allclose(tenth[path], 0.1 * full[path], rtol=1e-4, atol=1e-8, err_msg=path)


def test_the_backbone_multiplier_scales_weight_decay_too():
    """Decoupled decay moves a variable by lr * decay * value: at a tenth of the rate, a tenth of it."""
    strategy = tf.distribute.get_strategy()
    moved, _ = _one_step(strategy, optimizer="adamw", multiplier=0.1, precision="float32", weight_decay=0.5,
                         zero_gradients=True)  # Only decay can move anything.
    keras.utils.set_random_seed(5)
    start = {w.path: w.numpy() for w in build_classifier(
        backbone="small_cnn", image_size=16, channels=1, num_classes=3).weights}
    for path, rate in (("logits/kernel", 0.01), ("block1_conv/kernel", 0.001), ("block3_conv/kernel", 0.001)):
        spacing = 2 * np.spacing(np.abs(start[path]).max())  # Rounding of the float32 `w - w * decay`.
        np.testing.assert_allclose(moved[path], -rate * 0.5 * start[path], rtol=1e-5, atol=spacing, err_msg=path)
    for path in ("logits/bias", "block1_bn/gamma", "block1_bn/beta"):  # Never decayed.
        assert not moved[path].any(), path


class CustomBatchNorm(keras.layers.BatchNormalization):
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask) * 2.0


def test_the_fused_batch_norm_patch_applies_to_keras_own_class_only():
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, CustomBatchNorm(name="custom")(keras.layers.BatchNormalization(name="own")(inputs)))
    with internals.fused_batch_norm(model.layers):
        assert "call" in vars(model.get_layer("own"))
        assert "call" not in vars(model.get_layer("custom")), "a subclass with its own call was patched"
    assert "call" not in vars(model.get_layer("own"))


def _chained(cause, outer):
    try:
        try:
            raise cause
        except Exception:
            raise outer
    except Exception as error:
        return error


def test_download_and_prepare_failures_are_told_from_bugs():
    fetch = _chained(urllib.error.URLError("refused"), Exception("URL fetch failure on https://x: None -- refused"))
    assert internals.is_download_failure(fetch)
    assert internals.is_download_failure(PermissionError("cannot write the cache"))
    assert not internals.is_download_failure(Exception("a bug"))
    assert not internals.is_download_failure(TypeError("a bug"))
    assert internals.is_prepare_failure(ConnectionError("no network"))
    assert internals.is_prepare_failure(AssertionError("Manual directory /x does not exist or is empty."))
    assert not internals.is_prepare_failure(AssertionError("a bug"))
    assert not internals.is_prepare_failure(KeyError("a bug"))


def test_split_strings_select_tfds_ranges():
    assert internals.split_slices("train", 13) == [slice(None, None)]
    assert internals.split_slices("train[:50%]", 13) == [slice(None, 6)]
    assert internals.split_slices("train[:3]+train[-2:]", 13) == [slice(None, 3), slice(11, None)]
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        internals.split_slices("test", 13)


def test_full_disk_errors_name_the_file_and_other_errors_are_none():
    import errno

    assert internals.full_disk_path(OSError(errno.ENOSPC, "No space left on device", "/d/run/model.keras")) == (
        "/d/run/model.keras"
    )
    h5py_style = OSError(errno.ENOSPC, "Can't write data (filename = '/d/run/x.weights.h5', errno = 28)")
    assert internals.full_disk_path(h5py_style) == "/d/run/x.weights.h5"
    saving = tf.errors.ResourceExhaustedError(
        None, None, "{{function_node SaveV2}} /d/run/checkpoints/ckpt-99_temp/part-00000-of-00001.data; "
        "No space left on device [Op:SaveV2]")
    assert internals.full_disk_path(saving) == "/d/run/checkpoints/ckpt-99"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/d/q")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert internals.full_disk_path(outer) == "/d/q"
    assert internals.full_disk_path(OSError(errno.EACCES, "Permission denied", "/d/x")) is None
    assert internals.full_disk_path(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")) is None


def test_native_info_lines_are_held_back_and_everything_else_is_written(capfd):
    with internals.quiet_native_info():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8\n")
        os.write(2, b"ERROR: a native error a user must see\n")
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"E0000 00:00:1796043766.515896   20853 node_def_util.cc:682] NodeDef mentions attribute "
                    b"use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset; signature=...\n")
        os.write(2, b"E0000 00:00:1796043766.515896   20853 other.cc:1] another native error\n")
        os.write(1, b"INFO: on stdout too\nprinted\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("printed\n", "ERROR: a native error a user must see\n"
                                        "E0000 00:00:1796043766.515896   20853 other.cc:1] another native error\n")


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN is asked for on x86-64")
@pytest.mark.parametrize("setting, enabled", [(None, "True"), ("0", "False")])
def test_onednn_kernels_are_on_unless_the_user_says_no_and_tensorflow_loads_quietly(setting, enabled):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    done = subprocess.run(
        [sys.executable, "-c", "from transfer_engine import internals; print(internals.onednn_enabled())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{enabled}\n", "")
