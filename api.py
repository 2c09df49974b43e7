"""The Python API: launch.py's jobs as functions, for notebooks and scripts.

    import transfer_engine as te

    results = te.train(flagfile="configs/frozen.flags", model_dir="runs/frozen", epochs=5)
    te.predict("runs/frozen", images)  # file paths, folders, globs, or a numpy array of images

Keyword arguments are the flags by name, parsed and validated by the same code as launch.py's command
line (`flagfile=` reads a flagfile first, as --flagfile does; a shipped one is found from any directory).
A bad value raises a ValueError (errors.ConfigError or UsageError) whose message is the line launch.py
prints; other errors.RunError (divergence, a failed mode of compare) are raised as they are. Nothing
exits the process. Logging is set up on first use: launch.py's INFO lines, on stderr.
"""

import os

from transfer_engine import internals, startup  # First: TensorFlow's process defaults, then TensorFlow.
from absl import flags
import numpy as np
import tensorflow as tf

from transfer_engine.data import pipeline
from transfer_engine.engine import config as config_lib
from transfer_engine.engine import jobs
from transfer_engine.engine.jobs.predict import answer, top_classes
from transfer_engine.errors import ConfigError, UsageError  # noqa: F401  Part of the API.

_logging_configured = False


def config(**flag_values):
    """The validated engine Config of these flags (what launch.py would run): e.g. to inspect it."""
    values = flags.FlagValues()
    config_lib.define_flags(values)
    startup.resolve_flagfiles(values, config_lib.shipped)
    flagfile = flag_values.pop("flagfile", None)
    argv = ["transfer_engine"] + ([f"--flagfile={flagfile}"] if flagfile else [])
    argv += [f"--{name}={_as_flag(value)}" for name, value in flag_values.items() if value is not None]
    config_lib.parse_args(argv, values)
    return config_lib.from_flags(values)


def _as_flag(value):
    """A Python value as its flag text: True -> true, (6, 0, 2) -> 6,0,2."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _logging():
    """launch.py's logging, set up once per process (on the first call of the API)."""
    global _logging_configured
    if not _logging_configured:
        if not flags.FLAGS.is_parsed():  # absl warns that it logs "before flag parsing" otherwise.
            flags.FLAGS.mark_as_parsed()
        internals.configure_logging()
        _logging_configured = True


def _run(job, flag_values):
    if flag_values.get("job", job) != job:
        raise UsageError(f"--job={flag_values['job']}: transfer_engine.{job} runs --job={job}; call "
                         f"transfer_engine.{flag_values['job']} instead")
    _logging()
    return jobs.run(config(**{**flag_values, "job": job}))


def train(**flags):
    """Trains (or resumes) the run in `model_dir`; returns its results (what results.json holds)."""
    return _run("train", flags)


def evaluate(model_dir, **flags):
    """The latest checkpoint of `model_dir` on its eval and test splits (what evaluation.json holds)."""
    return _run("evaluate", {"model_dir": model_dir, **flags})


def compare(**flags):
    """Every mode with the same flags, each in model_dir/<mode>; returns the report (compare.json)."""
    return _run("compare", flags)


def export(model_dir, **flags):
    """model.keras of `model_dir` as --export_format artifacts, checked against it; returns export.json's."""
    return _run("export", {"model_dir": model_dir, **flags})


def lr_find(**flags):
    """The learning-rate range test; returns what lr_find.json holds."""
    return _run("lr_find", flags)


def inspect(**flags):
    """Duplicates and suspect labels in the data of `flags`; returns what inspect.json holds."""
    return _run("inspect", flags)


def benchmark(**flags):
    """Throughput per mode against Keras' fit; returns what benchmark.json holds."""
    return _run("benchmark", flags)


def predict(model_dir, images, **flags):
    """The top classes of `images` by the run in `model_dir`: a list, per image, of {"answer": the top
    class, or "unknown" below --min_confidence, "classes": top --top_k class names, "probabilities": theirs,
    calibrated by the run's temperature} (and "path" for files).

    `images`: file paths, folders or globs (a str or a list; written to predictions.csv as --job=predict
    does, files that do not decode left out and logged), or a numpy array (or nested lists) of uint8
    images: a batch [N, H, W, C] or [N, H, W] (gray), or one [H, W, C] or [H, W]; any size and 1 to 4
    channels, converted and resized as training saw its images."""
    if not isinstance(images, (np.ndarray, str, os.PathLike)) and not all(
            isinstance(item, (str, os.PathLike)) for item in images):
        images = np.asarray(images)  # Nested lists of pixels, as a numpy array.
    if not isinstance(images, np.ndarray):
        inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        return _run("predict", {"model_dir": model_dir, "inputs": [os.fspath(path) for path in inputs],
                                **flags})["predictions"]
    array = _image_array(images)
    _logging()
    run = config(job="predict", model_dir=model_dir, **flags)
    jobs.prepare_process(run)
    conform = lambda image, image_size, channels, max_pixels: pipeline.conform(image, image_size=image_size, channels=channels)
    found = top_classes(run, tf.data.Dataset.from_tensor_slices(array), len(array), decode=conform)
    return [{"answer": answer(*found[index], run.min_confidence), "classes": found[index][0],
             "probabilities": found[index][1]} for index in range(len(array))]


def _image_array(images):
    """`images` as uint8 [N, H, W, C]: [N, H, W, C] as it is; [H, W] one gray image; [H, W, C] with C of 1
    to 4 one image, else [N, H, W] gray images (Fashion-MNIST's shape)."""
    shape = "x".join(map(str, images.shape))
    if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] <= 4):
        images = images[None]
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] > 4 or 0 in images.shape:
        raise ConfigError("images", shape, "must be images: [N, height, width, 1 to 4 channels], [N, height, width] "
                          "gray, or one [height, width, channels] or [height, width]")
    if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
        raise ConfigError("images", f"{shape} {images.dtype}", "must hold integer pixel values 0 to 255 (uint8)")
    return images.astype(np.uint8)
