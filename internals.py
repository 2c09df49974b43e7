"""The one door to library internals: everything this project relies on that Keras, TensorFlow or
TensorFlow Datasets do not promise to keep (private methods, instance patches, error texts,
`tensorflow.python`). absl's flag-file hook is in startup.py, which must not load TensorFlow.

Checked against the versions in CHECKED; `check_versions` refuses another major version with one line
(launch.py calls it first), so an upgrade fails here, plainly, not deep inside a run. After upgrading
any of them, `python -m pytest -q tests/test_internals.py` checks every function below against the
installed versions.
"""

import contextlib
import errno
import logging as std_logging
import os
import platform
import re
import sys
import tempfile
import urllib.error
import warnings

from absl import logging as absl_logging

from transfer_engine import startup  # noqa: F401  First: TensorFlow's process defaults, before it loads.

NATIVE_CHATTER = re.compile(
    r"(INFO: |fully_quantize: )"  # LiteRT's and its converter's INFO lines.
    # TensorFlow's load says so at INFO level, whatever TF_CPP_MIN_LOG_LEVEL says.
    r"|I0000 .*oneDNN custom operations are on"
    # tf.data's rewrite of a parallel map into a sequential one under op determinism copies an attribute
    # the sequential op lacks, and says so at ERROR level (harmless: "Unknown attributes will be ignored"),
    # after absl's note that logging is not initialised.
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|E0000 .*NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset"
)


@contextlib.contextmanager
def quiet_native_info():
    """Holds what native code writes to file descriptors 1 and 2 while the block runs, then writes back
    every line but NATIVE_CHATTER's: TensorFlow's load ("oneDNN custom operations are on"), LiteRT's
    interpreter ("INFO: Created TensorFlow Lite XNNPACK delegate"), the TFLite converter ("fully_quantize:
    0, ...") and tf.data under op determinism (in evaluation) print lines from C++ that neither
    TF_CPP_MIN_LOG_LEVEL nor a Python logger controls."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    held = {fd: tempfile.TemporaryFile() for fd in saved}
    try:
        for fd, file in held.items():
            os.dup2(file.fileno(), fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, file in held.items():
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            file.seek(0)
            kept = [line for line in file.read().splitlines(keepends=True) if not NATIVE_CHATTER.match(line.decode(errors="replace"))]
            file.close()
            os.write(fd, b"".join(kept))


with quiet_native_info():
    import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow.python.framework import ops as tf_ops  # noqa: E402  Per-op FLOP counts: no public API has them.
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError  # noqa: E402

from transfer_engine.errors import UnsupportedLibrary, first_line  # noqa: E402

CHECKED = {"keras": "3.15.1", "tensorflow": "2.21.0", "tensorflow_datasets": "4.9.10"}
_INSTALLED = {"keras": keras.__version__, "tensorflow": tf.__version__, "tensorflow_datasets": tfds.__version__}


# Where this project's modules are: its top-level modules and its packages, sub-packages included (each
# folder of engine/, models/ and data/ with an __init__.py; not their data folders).
ROOT = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIRS = frozenset([ROOT] + [folder for package in ("engine", "models", "data")
                                   for folder, _, files in os.walk(os.path.join(ROOT, package)) if "__init__.py" in files])


def _from_this_project(record):
    """Keeps WARNING and above from anyone, INFO from this project's modules only: absl logs every
    library's lines through one logger, so the file a line comes from is what tells them apart (not a
    path prefix: a virtualenv at /x/repo-venv or /x/repo/venv is not the project at /x/repo)."""
    return record.levelno >= std_logging.WARNING or os.path.dirname(os.path.abspath(record.pathname)) in PROJECT_DIRS


def configure_logging(everything=False):
    """Time-stamped INFO lines from this project; libraries only speak up from WARNING. With absl's
    --verbosity given (`everything`), its level holds for every library's lines. launch.py and the Python
    API (on first use) call it."""
    absl_logging.use_absl_handler()  # absl's app.run does it for launch.py; the Python API has no app.run.
    handler = absl_logging.get_absl_handler().python_handler
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if everything:
        handler.removeFilter(_from_this_project)
        tf.get_logger().setLevel(std_logging.NOTSET)
    else:
        absl_logging.set_verbosity(absl_logging.INFO)
        if _from_this_project not in handler.filters:
            handler.addFilter(_from_this_project)
        tf.get_logger().setLevel("WARNING")
    # TensorFlow's Python logger writes through a handler of its own and passes each line on to absl's
    # too: every TensorFlow warning came out twice. Absl's handler alone writes them, time-stamped.
    for own in list(tf.get_logger().handlers):
        tf.get_logger().removeHandler(own)
    quiet_deprecations()
    warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN CPU kernels in this process (this module asks for them on
    x86-64, above; TensorFlow decides when it loads). No public API says."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def check_versions(installed=_INSTALLED):
    """Raises UnsupportedLibrary if a library's major version is not the one checked."""
    for name, checked in CHECKED.items():
        version = installed[name]
        if version.split(".")[0] != checked.split(".")[0]:
            major = checked.split(".")[0]
            raise UnsupportedLibrary(
                f"{name} {version} is installed, but this engine was checked against {name} {checked} "
                f"only: install {name} {major}.x (pip install '{name}>={major},<{int(major) + 1}')"
            )


# --- Keras optimizers: per-variable learning rates -------------------------------------------------
# Relies on: `Optimizer._get_variable_index` (private), the per-variable `update_step(gradient,
# variable, learning_rate)` being looked up on the instance, and `_apply_weight_decay(variables)`
# (private) reading `optimizer.weight_decay` when it runs (traces).


def scale_learning_rates(optimizer, variables, multipliers):
    """Makes a Keras 3 optimizer, built over `variables`, multiply its learning rate per variable,
    weight decay included.

    `multipliers` maps a variable's id to its multiplier (absent: 1). Keras 3 optimizers take one
    learning rate; a parameter group's rate belongs in the per-variable `update_step`, so the
    instance's `update_step` is wrapped there. Decoupled weight decay moves a variable by
    `learning_rate * weight_decay * variable`, so it follows the variable's rate too (as in timm's
    per-group rates and PyTorch's AdamW): a backbone at a tenth of the rate also decays at a tenth.
    """
    by_index = {optimizer._get_variable_index(variable): multipliers.get(id(variable), 1.0) for variable in variables}

    def multiplier(variable):
        return by_index[optimizer._get_variable_index(variable)]

    update_step = optimizer.update_step

    def scaled_update_step(gradient, variable, learning_rate):
        scale = multiplier(variable)
        return update_step(gradient, variable, learning_rate * scale if scale != 1.0 else learning_rate)

    apply_weight_decay = optimizer._apply_weight_decay

    def scaled_apply_weight_decay(variables):
        base = optimizer.weight_decay
        if base is None:
            return apply_weight_decay(variables)
        groups = {}
        for variable in variables:
            groups.setdefault(multiplier(variable), []).append(variable)
        try:
            for scale, group in groups.items():
                optimizer.weight_decay = base * scale
                apply_weight_decay(group)
        finally:
            optimizer.weight_decay = base

    optimizer.update_step = scaled_update_step
    optimizer._apply_weight_decay = scaled_apply_weight_decay


# --- Keras optimizer: the moving average --ema keeps of a variable ---------------------------------
# Relies on: `_model_variables_moving_average`, the averages a Keras 3 optimizer with use_ema builds, in
# the order of `_get_variable_index` (no public accessor; `finalize_variable_values` only overwrites).


def moving_average(optimizer, variable):
    """The moving average that `optimizer` (built with use_ema) keeps of `variable`."""
    return optimizer._model_variables_moving_average[optimizer._get_variable_index(variable)]


# --- Keras BatchNormalization: the fused kernel in training mode -----------------------------------
# Relies on: `Layer.__call__` dispatching to the instance's `call` attribute, and BatchNormalization's
# attributes (moving_mean, moving_variance, gamma, beta, momentum, epsilon, axis, center, scale,
# renorm, synchronized) meaning what they mean in Keras 3.15.

_BN = keras.layers.BatchNormalization
_FUSED_MIN_EPSILON = 1.001e-5  # FusedBatchNormV3 raises smaller epsilons to this; keep Keras' there.


def _fused_batch_norm_call(layer, keras_call):
    """`layer.call` that computes a training-mode BatchNorm with the fused kernel, with Keras 3's
    semantics (biased batch variance in the moving average, float32 math, momentum); every other case
    (inference, masks, renorm, synchronized, other axes or ranks) goes to Keras' own call."""

    def call(inputs, training=None, mask=None):
        usable = (
            training and layer.trainable and mask is None and not layer.renorm
            and not getattr(layer, "synchronized", False) and len(inputs.shape) == 4
            and layer.axis in (-1, 3) and layer.epsilon >= _FUSED_MIN_EPSILON
        )
        if not usable:
            return keras_call(inputs, training=training, mask=mask)
        inputs = tf.cast(inputs, "float32")
        channels = inputs.shape[-1]
        scale = tf.cast(layer.gamma, "float32") if layer.scale else tf.ones([channels])
        offset = tf.cast(layer.beta, "float32") if layer.center else tf.zeros([channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset, epsilon=layer.epsilon, is_training=True
        )
        # The kernel returns the unbiased variance; Keras' moving average uses the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        momentum = layer.momentum
        layer.moving_mean.assign(tf.cast(layer.moving_mean, "float32") * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(
            tf.cast(layer.moving_variance, "float32") * momentum + variance * (1.0 - momentum)
        )
        return tf.cast(outputs, layer.compute_dtype)

    return call


@contextlib.contextmanager
def fused_batch_norm(layers):
    """While a step traces (enter it in the cross-replica part, around `strategy.run`), every one of
    `layers` whose class is exactly `keras.layers.BatchNormalization` computes training mode with the
    fused kernel (a subclass, which may compute something else, keeps its own call). Instance
    attributes, so nothing outside the trace (another model, `fit`, a saved model) sees it."""
    layers = [layer for layer in layers if type(layer) is _BN]
    for layer in layers:
        layer.call = _fused_batch_norm_call(layer, _BN.call.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.call


# --- Keras applications: the EfficientNet builder ---------------------------------------------------
# Relies on: keras.src.applications.efficientnet.EfficientNet (the builder behind EfficientNetB0..B7,
# not exported) and its DEFAULT_BLOCKS_ARGS (B0's seven stages, as dicts with se_ratio).


def efficientnet_builder():
    """(EfficientNet, DEFAULT_BLOCKS_ARGS): Keras' own EfficientNet builder and B0's stages, from which
    models/backbones.py makes EfficientNet-Lite0 (no public Keras API builds another EfficientNet)."""
    from keras.src.applications import efficientnet

    return efficientnet.EfficientNet, efficientnet.DEFAULT_BLOCKS_ARGS


# --- TensorFlow: FLOPs per op ------------------------------------------------------------------------
# Relies on: `tensorflow.python.framework.ops.get_stats_for_node_def`, the registry behind
# tf.compat.v1.profiler's float_operation counts.


def op_flops(graph, op):
    """Floating-point operations of one op of a traced graph (0 where TensorFlow registers none)."""
    if op.type.startswith("DepthwiseConv2dNativeBackprop"):  # Unregistered: as many as the forward op.
        kernel = tf.get_static_value(op.inputs[1]) if op.type.endswith("Filter") else op.inputs[1].shape
        return 2 * int(np.prod(op.inputs[2].shape)) * int(kernel[0]) * int(kernel[1])
    try:
        return tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value or 0
    except ValueError:  # An op with unknown shapes: not a convolution or matmul of this model.
        return 0


# --- TensorFlow checkpoints and logging ----------------------------------------------------------------
# Relies on: tensorflow.python.checkpoint.checkpoint_management.update_checkpoint_state_internal (what
# the deprecated tf.compat.v1.train.update_checkpoint_state calls) and tensorflow.python.util.deprecation.


def write_checkpoint_state(directory, latest, paths):
    """Points `directory`'s `checkpoint` state file at `latest`, listing `paths` (oldest first) with their
    files' times, so a CheckpointManager opened on it manages them (deletes them beyond max_to_keep)."""
    from tensorflow.python.checkpoint import checkpoint_management

    times = [os.path.getmtime(path + ".index") for path in paths]
    checkpoint_management.update_checkpoint_state_internal(
        directory, latest, all_model_checkpoint_paths=paths, all_model_checkpoint_timestamps=times,
        last_preserved_timestamp=min(times) - 1,
    )


def quiet_deprecations():
    """TensorFlow's deprecation notices name its own internals (the preemption handler calls a deprecated
    property of itself): nothing a user can act on."""
    from tensorflow.python.util import deprecation

    deprecation._PRINT_DEPRECATION_WARNINGS = False


# --- What Keras and TFDS errors mean -----------------------------------------------------------------
# Relies on: their error classes, chaining and texts, as quoted in each function.


def weights_mismatch(error):
    """The one informative sentence out of Keras' multi-line weight-loading errors."""
    text = str(error)
    shapes = re.search(r"variable\.shape=(\(.*?\)), Received: value\.shape=(\(.*?\))", text)
    layer = re.search(r"object <\w+ name=([^,>]+)", text)
    if shapes and layer:
        return f"layer {layer.group(1)} expects shape {shapes.group(1)}, the file has {shapes.group(2)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("A total of"):
        return lines[1]
    return first_line(error)


def is_partial_load_warning(warning):
    """Whether a warning caught while loading weights is Keras saying it loaded only some of them."""
    return issubclass(warning.category, UserWarning) and "saving" in warning.filename


def is_download_failure(error):
    """Whether `keras.utils.get_file` (keras.applications' weights) failed to fetch or store a file.
    It raises a bare `Exception("URL fetch failure on ...")` from the URLError it caught, and a
    ValueError when the downloaded file's hash does not match."""
    if isinstance(error, OSError) or isinstance(error.__context__, urllib.error.URLError):
        return True
    return isinstance(error, ValueError) and "Incomplete or corrupted file detected" in str(error)


def is_empty_selection(error):
    """Whether a TFDS split error says the split string selects no example (`train[:0]`)."""
    return isinstance(error, ValueError) and "corresponds to no data" in str(error)


def is_prepare_failure(error):
    """Whether `builder.download_and_prepare` failed for want of its files: network, checksums, or a
    manual download missing (TFDS raises AssertionError("Manual directory ... does not exist ..."))."""
    if isinstance(error, (OSError, tfds.download.DownloadError, NonMatchingChecksumError)):
        return True
    return isinstance(error, AssertionError) and str(error).startswith("Manual directory")


NO_SPACE = ("No space left on device", "Disk quota exceeded")


def full_disk_path(error):
    """The file a write failed on for want of space (ENOSPC, EDQUOT), from `error` or what it was
    raised from; None for any other error. Python and h5py raise OSError (h5py names the file in
    `filename = '...'`), TensorFlow an OpError ending '<path>; No space left on device'; a checkpoint's
    temporary `ckpt-N_temp/...` is named as `ckpt-N`."""
    while error is not None:
        text = str(error)
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(error, tf.errors.OpError) and any(reason in text for reason in NO_SPACE)
        ):
            named = re.search(r"filename = '([^']+)'", text) or re.search(r"(\S+); (?:No space|Disk quota)", text)
            path = getattr(error, "filename", None) or (named.group(1) if named else "")
            return re.sub(r"_temp/.*$", "", path)
        error = error.__cause__ or error.__context__
    return None


def split_slices(split, num_examples):
    """The example ranges a TFDS split string (`train[:80%]`, `train[:10]+train[-5:]`) selects of one
    split named `train` of `num_examples` examples, by TFDS' own rules (ValueError if it names another
    split). Relies on the `from_` and `to` of TFDS' absolute read instructions."""
    splits = tfds.core.SplitDict([tfds.core.SplitInfo(name="train", shard_lengths=[num_examples], num_bytes=0)])
    return [slice(part.from_, part.to) for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)]


def split_parts(split):
    """The parts of a TFDS split string (`train[:10%]+train[-3:]`: `train[:10%]` and `train[-3:]`), each
    with whether it slices by percent, by TFDS' own parser (ValueError if a part is not a split string).
    Relies on `+` being TFDS' separator (its private `_ADDITION_SEP_RE`) and on the `unit` of its
    ReadInstruction (`all` parses to another class, which has none: not a percent slice)."""
    parts = re.split(r"\s*\+\s*", split)
    return [(part, getattr(tfds.core.ReadInstruction.from_spec(part), "unit", None) == "%") for part in parts]


def mediapipe_metadata_writer():
    """MediaPipe's image-classifier metadata writer (package mediapipe, the `.[mediapipe]` extra), or None
    when it is not installed. mediapipe 1.2's wheel leaves out the C++ helper its metadata module imports
    (mediapipe.tasks.cc.metadata.python._pywrap_metadata_version), used only to fill the metadata's
    min_parser_version: stood in here by the oldest parser version, which MediaPipe's ImageClassifier reads."""
    import types

    helper = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return None
    if helper not in sys.modules:
        try:
            __import__(helper)
        except ImportError:
            stand_in = types.ModuleType(helper)
            stand_in.GetMinimumMetadataParserVersion = lambda *args, **kwargs: "1.0.0"
            for parent in ("mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata", "mediapipe.tasks.cc.metadata.python"):
                sys.modules.setdefault(parent, types.ModuleType(parent))
            sys.modules["mediapipe.tasks.cc.metadata.python"]._pywrap_metadata_version = stand_in
            sys.modules[helper] = stand_in
    from mediapipe.tasks.python.metadata.metadata_writers import image_classifier, metadata_writer

    return image_classifier, metadata_writer
