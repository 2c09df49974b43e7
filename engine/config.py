"""Every option of the engine: one frozen dataclass, the absl flags made from it, and validation.

Each option is declared once, below, with its default and help; `define_flags` turns the fields into
absl flags and `from_flags` turns parsed flags back into a validated `Config`. Validation happens here,
once, and raises `ConfigError`, which `launch.py` prints as one line naming the flag and its value.
"""

import dataclasses
import os
import re

from absl import flags

from transfer_engine.errors import ConfigError, UsageError
from transfer_engine.models import modes
from transfer_engine.models.architectures import ARCHITECTURES

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The checkout, or where it is installed.
JOBS = ("train", "evaluate", "export", "predict", "benchmark", "compare", "lr_find", "inspect")
EXPORT_FORMATS = ("saved_model", "litert", "litert_int8")
# Jobs that use a trained run: they take every option not given on the command line from the run's own
# flags.txt (so --model_dir is all they need), and refuse a given one that would describe another model.
RUN_JOBS = ("evaluate", "export", "predict")
EVERY_MODE_JOBS = ("compare", "benchmark")  # Jobs that run every mode: the flags describe finetune.
BN_POLICIES = ("frozen", "train")
AUGMENTATIONS = ("none", "flip", "flip_crop", "randaugment")
OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw")
LR_SCHEDULES = ("constant", "cosine")
STRATEGIES = ("auto", "default", "mirrored", "one_device", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
AUTO_TRUE_FALSE = ("auto", "true", "false")
NO_RULE = {"unfreeze": 0, "unfreeze_from": "", "trainable_regex": ""}


@dataclasses.dataclass(frozen=True)
class FlagGroup:
    """A group of flags in --help and docs/flags.md, with the docs page that tells more."""

    title: str
    page: str


RUN = FlagGroup("What to run", "using-a-trained-model.md")
TRAINS = FlagGroup("What trains", "what-trains.md")
MODEL = FlagGroup("The model", "what-trains.md")
DATA = FlagGroup("The data", "data.md")
OPTIMISATION = FlagGroup("Optimisation", "recipes.md")
DEVICES = FlagGroup("Devices", "multi-gpu.md")
FAULTS = FlagGroup("Checkpoints and faults", "reliability.md")
TRUST = FlagGroup("Trust", "trust.md")
USING = FlagGroup("Using a trained run", "using-a-trained-model.md")
GROUPS = (RUN, TRAINS, MODEL, DATA, OPTIMISATION, DEVICES, FAULTS, TRUST, USING)

# A flag's role for a run, each including the ones after it:
# RUN_MODEL: describes the model a run holds. Jobs that use a trained run (RUN_JOBS) take every option not
#   given on the command line from the run's flags.txt, and refuse one of these given with another value.
RUN_MODEL = "run model"
# IDENTITY: fixes which run it is; resuming with another value is refused. They fix which examples make each
#   step (splits, batch, seed, shuffling), the optimizer's state (its checkpoint holds the learning rate), the
#   loss (smoothing, class weights) and what the checkpoint holds (--ema's averages).
IDENTITY = "identity"
# HPARAM: describes what trained and how: a column of the run's row in TensorBoard's HParams table.
HPARAM = "hparam"
# SETTING: where files are, how the work is scheduled, what a later job does: none of the above.
SETTING = "setting"
ROLES = (RUN_MODEL, IDENTITY, HPARAM, SETTING)


def _range(holds, message):
    """A check of one value: its message where `holds(value)` fails (NaN too), else None; None passes."""
    return lambda value: None if value is None or holds(value) else message


def positive(note="", message="must be positive"):
    return _range(lambda value: value > 0, message + note)


def not_negative(note="", message="must not be negative"):
    return _range(lambda value: value >= 0, message + note)


def fraction(note=""):
    return _range(lambda value: 0 <= value < 1, "must be in [0, 1)" + note)


def probability():
    return _range(lambda value: 0 < value <= 1, "must be in (0, 1]")


def _option(default, help_text, *, group, role, valid=None, choices=None, kind=None, auto=False):
    """A config field with its facts: its `group` in --help, its `role` for a run (ROLES), `valid`, the
    check of its value alone (a message where it fails; None: any value of its type); `kind` says the flag
    type where the default (None) cannot; with `auto`, the value auto is None, as if the flag were not
    given (so a command line can undo a flagfile's value)."""
    assert group in GROUPS and role in ROLES, (group, role)
    return dataclasses.field(
        default=default,
        metadata={"help": help_text, "choices": choices, "kind": kind or type(default), "auto": auto,
                  "group": group, "role": role, "valid": valid},
    )


@dataclasses.dataclass(frozen=True)
class Config:
    # What to run.
    job: str = _option(
        "train",
        "What to run: train, evaluate, export or predict with a run; benchmark throughput; compare trains "
        "every mode (scratch, frozen, finetune, and staged with --head_epochs) into model_dir/<mode>/, "
        "--mode unused; lr_find sweeps the learning rate (lr_find.json, lr_find.png), training nothing it "
        "keeps; inspect finds duplicates and suspect labels in the data (duplicates.csv, suspect_labels.csv, "
        "inspect.png). export and predict read the run's flags.txt: they need only --model_dir.",
        choices=JOBS, group=RUN, role=SETTING,
    )
    model_dir: str = _option(
        None, "Run directory: checkpoints, logs, metrics, results.", kind=str,
        group=RUN, role=SETTING,
    )
    # Which layers receive gradients.
    mode: str = _option(
        "frozen",
        "scratch: random backbone, all trains; frozen: pretrained backbone fixed, head trains; "
        "finetune: pretrained backbone, top --unfreeze layers and head train; lora: pretrained backbone fixed, "
        "head and low-rank factors beside its Conv2D/Dense kernels train (Keras LoRA).",
        choices=modes.FLAG_VALUES, group=TRAINS, role=IDENTITY,
    )
    lora_rank: int = _option(
        4, "lora: the rank of the factors beside each Conv2D and Dense kernel of the backbone.",
        group=TRAINS, role=IDENTITY, valid=positive(),
    )
    # finetune rules: exactly one of these three.
    unfreeze: int = _option(
        0, "finetune: how many of the backbone's top layers with weights train.",
        group=TRAINS, role=IDENTITY, valid=not_negative(),
    )
    unfreeze_from: str = _option(
        "", "finetune: this backbone layer and every layer above it train.",
        group=TRAINS, role=IDENTITY,
    )
    trainable_regex: str = _option(
        "", "finetune: backbone variables whose path (e.g. block_16_project/kernel) matches train.",
        group=TRAINS, role=IDENTITY,
    )
    bn: str = _option(
        "frozen",
        "frozen: backbone BatchNorm stays in inference mode with fixed statistics, even in unfrozen "
        "layers; train: unfrozen BatchNorm layers train and update their statistics. "
        "(scratch always trains them.)",
        choices=BN_POLICIES, group=TRAINS, role=IDENTITY,
    )
    head_epochs: int = _option(
        0, "finetune: train the head alone for this many epochs first, then unfreeze (staged).",
        group=TRAINS, role=HPARAM, valid=not_negative(),
    )
    backbone_lr_mult: float = _option(
        1.0, "Learning-rate multiplier of backbone variables (discriminative rates), e.g. 0.1.",
        group=TRAINS, role=HPARAM, valid=positive(" (freeze with --mode)"),
    )
    # The model.
    backbone: str = _option(
        "mobilenet_v2", "Backbone architecture.", choices=tuple(ARCHITECTURES),
        group=MODEL, role=RUN_MODEL,
    )
    alpha: float = _option(1.0, "Width multiplier of the MobileNets.", group=MODEL, role=RUN_MODEL, valid=positive())
    image_size: int = _option(
        None, "Square input size in pixels (default: the backbone's own).", kind=int,
        group=MODEL, role=RUN_MODEL, valid=positive(),
    )
    weights: str = _option(
        "imagenet",
        "Backbone weights: imagenet, none, a .weights.h5/.keras file, or an earlier run's model_dir. "
        "Ignored in scratch mode.", group=MODEL, role=HPARAM,
    )
    dropout: float = _option(
        0.2, "Dropout rate before the classifier layer (0 disables).",
        group=MODEL, role=HPARAM, valid=fraction(),
    )
    bn_momentum: float = _option(
        None,
        "Momentum of the moving statistics of BatchNorm layers that train (default: the backbone's "
        "own; keras.applications use 0.999, too slow for short runs from scratch).",
        kind=float, group=MODEL, role=HPARAM, valid=fraction(),
    )
    # The data.
    dataset: str = _option(
        "fashion_mnist",
        "Any TFDS image-classification dataset (fashion_mnist_sample: the main job's images, shipped with this "
        "project), or folder:PATH, a folder with one sub-folder of images per class.", group=DATA, role=RUN_MODEL,
    )
    data_dir: str = _option(None, "TFDS data directory (default: TFDS's own).", kind=str, group=DATA, role=SETTING)
    manual_dir: str = _option(
        None,
        "Directory of manually downloaded files. fashion_mnist: the four IDX .gz files "
        "(default: Debian's dataset-fashion-mnist location when present).",
        kind=str, group=DATA, role=SETTING,
    )
    train_split: str = _option(
        None,
        "TFDS split string to train on, or auto (as unset): by the splits the dataset has, train with a validation "
        "split, else train[:90%] with a test split, else (one split, train: folders, cats_vs_dogs) train[:80%]. "
        "A folder's percent slices take that share of every class.",
        kind=str, auto=True, group=DATA, role=IDENTITY,
    )
    eval_split: str = _option(
        None,
        "TFDS split string evaluated after each epoch ('' skips), or auto (as unset): validation, else "
        "train[90%:], else train[80%:90%] (see --train_split).",
        kind=str, auto=True, group=DATA, role=HPARAM,
    )
    test_split: str = _option(
        None,
        "TFDS split string evaluated once at the end ('' skips), or auto (as unset): test, else train[90%:] "
        "(see --train_split).",
        kind=str, auto=True, group=DATA, role=HPARAM,
    )
    label_subset: tuple = _option(
        (), "Keep only these labels, relabelled 0..k-1 in the order given, e.g. 6,0,2 (empty: every label).",
        kind=list, group=DATA, role=RUN_MODEL,
    )
    cache: str = _option(
        "memory", "Decoded images: memory, none, or a directory for cache files (shared by runs, at the same time "
        "too).", group=DATA, role=SETTING
    )
    cache_max_gb: float = _option(
        None,
        "Largest image cache kept in memory with --cache=memory, estimated from the splits' sizes before decoding "
        "(default: half of this machine's memory); over it the images are decoded every epoch instead (the same "
        "examples, slower; --cache=DIR keeps them in files).",
        kind=float, group=DATA, role=SETTING, valid=positive(),
    )
    shuffle_buffer: int = _option(
        10_000, "Shuffle buffer in examples; 0 shuffles the whole split.",
        group=DATA, role=IDENTITY, valid=not_negative(),
    )
    augment: str = _option(
        "none",
        "Training augmentation after the cache: flips, flips and random crops, or flips and Keras' RandAugment "
        "(2 operations, magnitude 0.5).",
        choices=AUGMENTATIONS, group=DATA, role=HPARAM,
    )
    mixup: float = _option(
        0.0, "MixUp (Keras' layer) of each training batch with this Beta alpha, e.g. 0.2; the loss takes the mixed "
        "labels (0: off).", group=DATA, role=HPARAM, valid=not_negative(" (0: off)"),
    )
    cutmix: float = _option(
        0.0, "CutMix (Keras' layer) of each training batch with this Beta alpha, e.g. 1.0; with --mixup too, each "
        "batch takes one of the two at random (0: off).", group=DATA, role=HPARAM, valid=not_negative(" (0: off)"),
    )
    deterministic: bool = _option(
        False, "Reproducible runs: op determinism and in-order tf.data (slower).", group=DATA, role=HPARAM
    )
    feature_cache: str = _option(
        "auto",
        "auto: without augmentation, run the frozen part of the model (below the lowest layer that trains) "
        "once per example and train the rest on its cached output (frozen, finetune, staged; exact, many "
        "times faster); off: always run the whole model.",
        choices=("auto", "off"), group=DATA, role=HPARAM,
    )
    max_image_pixels: int = _option(
        89_478_485,
        "Images whose header gives more pixels (width x height) are skipped unread and named, in training, "
        "evaluation, export and predict: a 1.2 MB file can decode to gigabytes. The default is PIL's limit.",
        group=DATA, role=SETTING, valid=positive(),
    )
    feature_cache_max_gb: float = _option(
        None,
        "Largest feature cache kept in memory (default: a quarter of this machine's memory); a larger one "
        "goes to files under --cache when that is a directory, else the run trains without it.",
        kind=float, group=DATA, role=SETTING, valid=positive(),
    )
    tta: bool = _option(
        False,
        "Test-time augmentation: evaluation, the test split and --job=predict average each image's logits "
        "with its mirror image's (training unchanged; the feature cache then stays off).", group=DATA, role=HPARAM,
    )
    # Optimisation.
    batch_size: int = _option(
        32, "Global batch size of an update, split evenly across replicas.",
        group=OPTIMISATION, role=IDENTITY, valid=positive(),
    )
    grad_accum_steps: int = _option(
        1,
        "Gradient accumulation: each update averages the gradients of this many steps of --batch_size / N "
        "examples each (large batches on small devices); steps, --steps_per_epoch and --checkpoint_every "
        "count those steps, --warmup_steps updates.", group=OPTIMISATION, role=IDENTITY, valid=positive(),
    )
    epochs: int = _option(10, "Training epochs.", group=OPTIMISATION, role=HPARAM, valid=positive())
    steps_per_epoch: int = _option(
        None, "Cap on training steps per epoch (default: one pass).", kind=int,
        group=OPTIMISATION, role=IDENTITY, valid=positive(),
    )
    early_stopping: int = _option(
        0, "Stop once this many epochs in a row have not raised the eval accuracy (0: train every epoch).",
        group=OPTIMISATION, role=HPARAM, valid=not_negative(),
    )
    keep_best: bool = _option(
        False,
        "model.keras, backbone.weights.h5, the test and results.json come from the epoch of the best eval "
        "accuracy (its checkpoint kept in model_dir/best, apart from the rolling ones), not the last.",
        group=OPTIMISATION, role=HPARAM,
    )
    steps_per_loop: int = _option(
        10, "Training steps run inside one tf.function call.",
        group=OPTIMISATION, role=SETTING, valid=positive(),
    )
    optimizer: str = _option(
        "adam", "Optimizer (sgd uses momentum 0.9).", choices=OPTIMIZERS,
        group=OPTIMISATION, role=IDENTITY,
    )
    learning_rate: float = _option(1e-3, "Learning rate.", group=OPTIMISATION, role=IDENTITY, valid=positive())
    lr_schedule: str = _option(
        "constant", "constant, or cosine decay to 0 over the run.", choices=LR_SCHEDULES,
        group=OPTIMISATION, role=IDENTITY,
    )
    warmup_steps: int = _option(
        0, "Linear learning-rate warm-up from 0 over this many steps.",
        group=OPTIMISATION, role=IDENTITY, valid=not_negative(),
    )
    weight_decay: float = _option(
        0.0, "Decoupled weight decay; never applied to biases or BatchNorm.",
        group=OPTIMISATION, role=HPARAM, valid=not_negative(),
    )
    label_smoothing: float = _option(
        0.0, "Label smoothing of the training loss: targets (1 - EPS) one-hot + EPS / classes (0: off).",
        group=OPTIMISATION, role=IDENTITY, valid=fraction(),
    )
    class_weight: str = _option(
        "none",
        "balanced: each training example's loss is weighted by its class's inverse frequency in the train "
        "split (exact counts, mean weight 1 over the classes); evaluation stays unweighted.",
        choices=("none", "balanced"), group=OPTIMISATION, role=IDENTITY,
    )
    ema: float = _option(
        0.0,
        "Exponential moving average of the trained weights with this decay (Keras' optimizer EMA, e.g. 0.99; "
        "0: off): evaluation, the test, model.keras and exports use the averaged weights.",
        group=OPTIMISATION, role=IDENTITY, valid=fraction(", e.g. 0.99 (0: off)"),
    )
    seed: int = _option(42, "Seed for initialisation, shuffling and dropout.", group=OPTIMISATION, role=IDENTITY)
    # Devices.
    strategy: str = _option(
        "auto",
        "auto: MirroredStrategy over several GPUs, OneDeviceStrategy on one, the default strategy (no "
        "distribution) on CPU; multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG; tpu: TPUStrategy.",
        choices=STRATEGIES, group=DEVICES, role=HPARAM,
    )
    tpu: str = _option(
        "", "--strategy=tpu: the TPU's name or grpc:// address ('' : TPU_NAME or local).",
        group=DEVICES, role=SETTING,
    )
    cpu_replicas: int = _option(
        1, "Split the host CPU into N logical devices and mirror over them (tests multi-replica).",
        group=DEVICES, role=HPARAM, valid=positive(),
    )
    precision: str = _option(
        "auto", "auto: mixed_float16 on GPUs of compute capability >= 7.0, else float32.",
        choices=PRECISIONS, group=DEVICES, role=HPARAM,
    )
    jit_compile: str = _option(
        "auto", "XLA for the per-replica step; auto: on one GPU only (not with several replicas: docs/multi-gpu.md; "
        "nor with --deterministic).", choices=AUTO_TRUE_FALSE, group=DEVICES, role=HPARAM,
    )
    fused_batchnorm: str = _option(
        "auto",
        "BatchNorm layers that train run as TensorFlow's fused kernel in the engine's steps; auto: on CPU, "
        "where it was measured faster (docs/how-it-works.md).",
        choices=AUTO_TRUE_FALSE, group=DEVICES, role=HPARAM,
    )
    checkpoint_every: int = _option(
        0, "Also checkpoint every this many steps within epochs (0: at epoch ends only).",
        group=FAULTS, role=SETTING, valid=not_negative(),
    )
    keep_checkpoints: int = _option(3, "How many checkpoints to keep.", group=FAULTS, role=SETTING, valid=positive())
    loss_upper_bound: float = _option(
        None,
        "Two training calls in a row whose mean loss is above this (or not finite) stop the run as diverged "
        "(default: 100 x ln(classes), a hundred times a uniform guess's loss).",
        kind=float, group=FAULTS, role=HPARAM, valid=positive(),
    )
    # Trust: what the data holds, what the confidence means.
    near_duplicate: float = _option(
        0.0,
        "--job=inspect: report two images as near duplicates when their features' cosine similarity (centred on "
        "the data's mean) is at least this; 0 (default) derives it from the data: the similarity of each "
        "image to a slightly changed copy of itself (docs/trust.md).", kind=float,
        group=TRUST, role=SETTING, valid=fraction(),
    )
    min_confidence: float = _option(
        0.0,
        "--job=predict: answer unknown when the calibrated probability of the top class is below this (train "
        "reports what it would accept of the eval and test splits).", kind=float,
        group=TRUST, role=SETTING, valid=fraction(),
    )
    target_accuracy: float = _option(
        None,
        "--job=train: the lowest confidence threshold whose accepted eval images reach this accuracy (in "
        "results.json and the log, to give predict as --min_confidence).", kind=float,
        group=TRUST, role=SETTING, valid=probability(),
    )
    unknown_dir: str = _option(
        "", "--job=train: a folder of images of none of the classes: the share of them the threshold rejects.",
        group=TRUST, role=SETTING,
    )
    # Using a trained run.
    export_format: tuple = _option(
        ("saved_model",),
        "--job=export: a comma list of saved_model (TF Serving; uint8 images of any size), litert "
        "(float32 .tflite) and litert_int8 (full-integer .tflite calibrated on the train split); each "
        "is checked against the Keras model on the test split (export.json).",
        kind=list, group=USING, role=SETTING,
    )
    max_class_drop: float = _option(
        5.0,
        "--job=export: warn about each class whose test accuracy with an artifact is more than this many "
        "percentage points below the Keras model's (int8 quantization can break a few classes while overall "
        "agreement stays high); 5 is one image of a 20-image class.",
        group=USING, role=SETTING,
        valid=not_negative(message="must be 0 or more accuracy points, e.g. 5 (0: warn about any drop)"),
    )
    inputs: tuple = _option(
        (), "--job=predict: comma list of image files, folders (searched recursively) and globs.", kind=list,
        group=USING, role=SETTING,
    )
    output: str = _option(
        None, "--job=predict: the CSV to write (default: model_dir/predictions.csv).", kind=str,
        group=USING, role=SETTING,
    )
    top_k: int = _option(
        1, "--job=predict: how many classes each row names, most probable first.",
        group=USING, role=SETTING, valid=positive(),
    )

    @property
    def step_batch(self):
        """Examples per training step: --batch_size, or its share of an update with --grad_accum_steps."""
        return self.batch_size // self.grad_accum_steps

    def to_flagfile(self):
        """The resolved options as flagfile text: rerunning with it rebuilds this config."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(map(str, value))
            lines.append(f"--{field.name}={value}")
        return "\n".join(lines) + "\n"


def _flags(**wanted):
    """The names of the fields whose metadata has `wanted`'s values (one each of a tuple's), in field order."""
    return tuple(field.name for field in dataclasses.fields(Config) if all(
        field.metadata[key] in (values if isinstance(values, tuple) else (values,)) for key, values in wanted.items()))


# --help's groups, and docs/flags.md's (flag_reference): (title, page, flags), from the fields.
FLAG_GROUPS = tuple((group.title, group.page, _flags(group=group)) for group in GROUPS)
RUN_MODEL_FLAGS = _flags(role=RUN_MODEL)
IDENTITY_FLAGS = _flags(role=(RUN_MODEL, IDENTITY))  # engine/core/run_dir.py's check_compatible.
HPARAM_FLAGS = _flags(role=(RUN_MODEL, IDENTITY, HPARAM))


def default_text(name):
    """A flag's default as a command line writes it ("" for none)."""
    default = next(field.default for field in dataclasses.fields(Config) if field.name == name)
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    if isinstance(default, bool):
        return str(default).lower()
    return "" if default is None else str(default)


def help_text(name):
    """A flag's help, with its choices."""
    meta = next(field.metadata for field in dataclasses.fields(Config) if field.name == name)
    return meta["help"] + (f" One of: {', '.join(meta['choices'])}." if meta["choices"] else "")


def flag_reference():
    """docs/flags.md: every flag with its default and help, in --help's groups. `python
    scripts/flag_reference.py` writes it; tests/test_docs.py fails when the page differs from this."""
    lines = [
        "# Flags", "",
        "Every flag of `python launch.py` (the `transfer-engine` command's, and the Python API's keywords), with its "
        "default, in the groups `--help` shows. Later flags override earlier ones and a flagfile's "
        "(`--flagfile=FILE`, one flag a line).", "",
        "Generated from `engine/config.py` by `python scripts/flag_reference.py`; do not edit it by hand "
        "(`tests/test_docs.py` fails when it differs from what that command writes).", "",
    ]
    for title, page, names in FLAG_GROUPS:
        lines += [f"## {title}", "", f"More in [{page}]({page}).", "", "| flag | default | what it does |",
                  "| --- | --- | --- |"]
        for name in names:
            default = default_text(name)
            lines.append(f"| `--{name}` | {f'`{default}`' if default else ''} | {help_text(name).replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def hparams(config):
    """{flag: value} for TensorBoard's HParams (numbers, strings, booleans; a list as its flag text)."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in HPARAM_FLAGS:
            values[field.name] = ",".join(map(str, value)) if isinstance(value, tuple) else "" if value is None else value
    return values


def define_flags(flag_values=flags.FLAGS):
    """Declares one absl flag per Config field (names, defaults and help come from the fields)."""
    definers = {
        str: flags.DEFINE_string,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        bool: flags.DEFINE_bool,
        list: flags.DEFINE_list,
    }
    for field in dataclasses.fields(Config):
        meta = field.metadata
        default = list(field.default) if meta["kind"] is list else field.default
        definers[meta["kind"]](field.name, default, help_text(field.name), flag_values=flag_values)


def parse_args(argv, flag_values=flags.FLAGS):
    """absl parses `argv` (argv[0] the program) into `flag_values`; what it refuses is a UsageError with its
    one line (launch.py prints it; the Python API raises it)."""
    try:
        return flag_values(argv)
    except flags.CantOpenFlagFileError as error:
        raise UsageError(f"--flagfile: {str(error).replace('ERROR:: ', '')}") from None
    except flags.Error as error:
        raise UsageError(str(error)) from None


def from_flags(flag_values=flags.FLAGS):
    """Builds and validates the Config from parsed flags; for RUN_JOBS, completed from the run's flags.txt."""
    values = {}
    for field in dataclasses.fields(Config):
        value = flag_values[field.name].value
        if field.metadata["auto"] and value == "auto":
            value = None
        elif field.name == "label_subset":
            value = _parse_labels(value)
        elif field.metadata["kind"] is list:
            value = tuple(value)
        values[field.name] = value
    config = validate(Config(**values))
    if config.job not in RUN_JOBS:
        return config
    return of_run(config, given={field.name for field in dataclasses.fields(Config) if flag_values[field.name].present})


def of_run(config, *, given):
    """The config of the run in `config.model_dir` (its flags.txt) with the options in `given` taken from
    `config`; one of RUN_MODEL given with another value than the run's is refused, as is a directory
    without flags.txt."""
    path = os.path.join(config.model_dir, "flags.txt")
    if not os.path.isfile(path):
        raise ConfigError("model_dir", config.model_dir, "has no flags.txt: not a run directory (train it first)")
    saved = flags.FlagValues()
    define_flags(saved)
    try:
        saved(["launch.py", f"--flagfile={path}"])
    except flags.Error as error:
        raise ConfigError("model_dir", config.model_dir, f"has a flags.txt this version cannot read ({error})") from None
    run = from_flags(saved)
    for name in RUN_MODEL_FLAGS:
        if name in given and getattr(config, name) != getattr(run, name):
            shown = getattr(run, name)
            shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
            raise ConfigError(name, getattr(config, name), f"the run in {config.model_dir} has --{name}={shown}")
    return validate(dataclasses.replace(run, **{name: getattr(config, name) for name in given | {"job", "model_dir"}}))


def _parse_labels(items):
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError("label_subset", items, "labels must be integers") from None


def validate(config):
    """Checks every option on its own and against the others; returns it with defaults resolved."""
    for field in dataclasses.fields(config):
        choices = field.metadata["choices"]
        value = getattr(config, field.name)
        if choices and value not in choices:
            raise ConfigError(field.name, value, f"must be one of {', '.join(choices)}")
    if config.image_size is None:
        config = dataclasses.replace(config, image_size=ARCHITECTURES[config.backbone].default_image_size)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        problem = field.metadata["valid"] and field.metadata["valid"](value)
        if problem:
            raise ConfigError(field.name, value, problem)
    if config.image_size is not None and config.image_size < 8:
        raise ConfigError("image_size", config.image_size, "must be at least 8 pixels")
    if config.alpha != 1.0 and not ARCHITECTURES[config.backbone].has_alpha:
        raise ConfigError("alpha", config.alpha, f"{config.backbone} has no width multiplier")
    if config.grad_accum_steps > 1 and config.job == "benchmark":
        raise ConfigError("grad_accum_steps", config.grad_accum_steps, "--job=benchmark measures steps of --batch_size: leave it at 1")
    for flag in ("early_stopping", "keep_best"):
        if getattr(config, flag) and config.eval_split == "":
            raise ConfigError(flag, getattr(config, flag), "needs an eval split to watch (--eval_split is '')")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError("grad_accum_steps", config.grad_accum_steps, f"must divide --batch_size={config.batch_size}")
    if not config.cache:
        raise ConfigError("cache", "", "must be memory, none or a directory")
    every_mode = config.job in EVERY_MODE_JOBS
    if config.head_epochs and not every_mode and config.mode not in modes.STAGED_FLAGS:
        raise ConfigError(
            "head_epochs", config.head_epochs, f"stages a --mode={'|'.join(modes.STAGED_FLAGS)} run only"
        )
    if config.head_epochs and config.head_epochs >= config.epochs:
        raise ConfigError(
            "head_epochs", config.head_epochs, f"leaves no epoch to fine-tune (--epochs={config.epochs})"
        )
    rules = {name: getattr(config, name) for name in NO_RULE if getattr(config, name)}
    # --job=compare and benchmark run every mode: the flags describe finetune, the others drop its rule.
    uses_rule = every_mode or modes.of_run(config.mode, config.head_epochs).backbone_trains == modes.RULE
    if uses_rule and len(rules) != 1:
        flag, value = next(iter(rules.items())) if rules else ("unfreeze", 0)
        raise ConfigError(
            flag, value,
            f"--{'job=' + config.job if every_mode else 'mode=' + config.mode} needs exactly one of "
            "--unfreeze, --unfreeze_from, --trainable_regex",
        )
    if not uses_rule and rules:
        flag, value = next(iter(rules.items()))
        raise ConfigError(
            flag, value, f"only --mode={'|'.join(modes.RULE_FLAGS)} unfreezes layers, not --mode={config.mode}"
        )
    if config.trainable_regex:
        try:
            re.compile(config.trainable_regex)
        except re.error as error:
            raise ConfigError(
                "trainable_regex", config.trainable_regex, f"not a regular expression ({error})"
            ) from None
    if len(set(config.label_subset)) != len(config.label_subset):
        raise ConfigError("label_subset", config.label_subset, "labels must not repeat")
    if any(label < 0 for label in config.label_subset):
        raise ConfigError("label_subset", config.label_subset, "labels must not be negative")
    if config.label_subset and len(config.label_subset) < 2:
        raise ConfigError("label_subset", config.label_subset, "a classifier needs at least 2 labels")
    if config.train_split == "":
        raise ConfigError("train_split", "", "must name a split")
    if not config.model_dir:
        raise ConfigError("model_dir", "", f"--job={config.job} needs a run directory")
    if config.strategy in ("default", "one_device", "multi_worker", "tpu") and config.cpu_replicas > 1:
        raise ConfigError(
            "cpu_replicas", config.cpu_replicas, f"needs --strategy=mirrored or auto, not {config.strategy}"
        )
    unknown = [name for name in config.export_format if name not in EXPORT_FORMATS]
    if unknown or not config.export_format:
        raise ConfigError("export_format", config.export_format, f"each must be one of {', '.join(EXPORT_FORMATS)}")
    if config.unknown_dir and not os.path.isdir(config.unknown_dir):
        raise ConfigError("unknown_dir", config.unknown_dir, "no such folder")
    if config.jit_compile == "true" and config.deterministic:
        raise ConfigError(
            "jit_compile", "true",
            "XLA has no deterministic implementation of some gradients (MaxPool's): drop --deterministic or XLA",
        )
    weights = shipped(config.weights)
    if weights not in ("imagenet", "none") and not os.path.exists(weights):
        raise ConfigError("weights", weights, "no such file or run directory")
    return dataclasses.replace(config, weights=weights) if weights != config.weights else config


def shipped(path):
    """`path` as given or, where it names nothing from the working directory, the file of that name shipped
    with the engine (configs/frozen.flags, models/pretrained/...): README's and the docs' commands work from any
    directory once the package is installed. launch.py resolves --flagfile paths with it too."""
    if path and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(PACKAGE_ROOT, path)
        if os.path.exists(candidate):
            return candidate
    return path


def for_mode(config, name, **changes):
    """The train config of mode `name` (a row of models/modes.py) from `config`, whose flags describe a
    finetune run (as --job=compare's and benchmark's do), with `changes`; validated."""
    mode = modes.MODES[name]
    values = {"job": "train", "mode": mode.flag, "head_epochs": config.head_epochs if mode.head_first else 0}
    if mode.backbone_trains != modes.RULE:
        values.update(NO_RULE)
    # A discriminative rate slows a pretrained backbone's weights; a random backbone, or LoRA's new factors
    # (the pretrained kernels stay fixed), need the full rate.
    if not mode.pretrained or mode.backbone_trains == modes.ADAPTERS:
        values["backbone_lr_mult"] = 1.0
    return validate(dataclasses.replace(config, **{**values, **changes}))
