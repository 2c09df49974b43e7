"""The assembly of a run: everything a job drives, built once from a validated config.

    config -> devices (engine/core/distribute.py) -> source and splits, decoded and cached (data/)
      -> classifier, its weights and what trains (models/) -> optimizer (engine/core/optimizer.py)
      -> run state and checkpoints (engine/core/checkpoints.py)

Every bad input is refused (ConfigError) before anything is written. The assembled `Run` is immutable;
what changes while it trains is its `RunState` (the step counter and the epoch's running sums, both
checkpointed) and the variables themselves.
"""

import dataclasses
import os
import time

from absl import logging
import keras
import tensorflow as tf

from transfer_engine.data import pipeline, sources
from transfer_engine.engine.core import distribute
from transfer_engine.engine.core.checkpoints import Checkpoints
from transfer_engine.engine.core.run_dir import read_flagfile
from transfer_engine.engine.core.optimizer import learning_rate_schedule, make_optimizer
from transfer_engine.errors import ConfigError, named
from transfer_engine.models import modes, trainability
from transfer_engine.models.architectures import ARCHITECTURES
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier, load_backbone_weights

SPLITS = ("train", "eval", "test")
FEW_IMAGES = 10  # Training images of a class below which a run warns.


@dataclasses.dataclass(frozen=True)
class RunState:
    """What a run changes as it trains, besides its variables; checkpointed with them."""

    step: tf.Variable  # Global training steps done.
    epoch_sums: tf.Variable  # The current epoch's (loss, correct, examples) so far.


@dataclasses.dataclass(frozen=True)
class Run:
    """An assembled run."""

    config: object  # engine.config.Config
    devices: distribute.Devices
    source: sources.Source
    splits: dict  # {"train", "eval", "test": pipeline.Examples, or None for a split not asked for}
    steps_per_epoch: int
    model: keras.Model
    trained_variables: list  # Every variable the run trains, in any stage.
    optimizer: keras.optimizers.Optimizer
    state: RunState
    checkpoints: Checkpoints

    @property
    def mode(self):
        return modes.of_run(self.config.mode, self.config.head_epochs)

    @property
    def worker(self):
        return pipeline.Worker(self.devices.worker_index, self.devices.num_workers)

    @property
    def epochs_done(self):
        return int(self.state.step.numpy()) // self.steps_per_epoch

    def train_dataset(self, examples=None):
        """The distributed training stream of `examples` (default: the train split), positioned at the
        checkpointed step."""
        config, examples = self.config, examples or self.splits["train"]
        first_epoch, done = divmod(int(self.state.step.numpy()), self.steps_per_epoch)
        local_replicas = self.devices.num_replicas // self.devices.num_workers

        def dataset_fn(context):
            self._check_shard(context)
            return pipeline.train_dataset(
                examples, batch_size=context.get_per_replica_batch_size(config.step_batch),
                batches_per_epoch=self.steps_per_epoch * local_replicas, seed=config.seed,
                epochs=config.epochs, first_epoch=first_epoch, skip_batches=done * local_replicas,
                augmentation=pipeline.Augmentation.of(config, self.source.num_classes), shuffle_buffer=config.shuffle_buffer,
                deterministic=config.deterministic,
            )

        return self.devices.strategy.distribute_datasets_from_function(dataset_fn)

    def eval_dataset(self, examples, batch_size=None, *, positions=False):
        """The distributed evaluation dataset of `examples` (None for None) in global batches of
        `batch_size` (default --batch_size): every example once, with weight-0 padding so every replica
        and worker runs the same steps; with `positions`, each example's place (engine/reports/predictions.py)."""
        if examples is None:
            return None
        config, batch_size = self.config, batch_size or self.config.batch_size
        steps = pipeline.eval_steps(examples.split, batch_size, self.worker)
        local_replicas = self.devices.num_replicas // self.devices.num_workers

        def dataset_fn(context):
            self._check_shard(context)
            return pipeline.eval_dataset(
                examples, batch_size=context.get_per_replica_batch_size(batch_size), steps=steps,
                local_replicas=local_replicas, deterministic=config.deterministic,
                positions_of=self.worker if positions else None,
            )

        return self.devices.strategy.distribute_datasets_from_function(dataset_fn)

    def _check_shard(self, context):
        worker = self.worker
        if (context.input_pipeline_id, context.num_input_pipelines) != (worker.index, worker.count):
            raise RuntimeError(f"input pipeline {context.input_pipeline_id} of {context.num_input_pipelines} "
                               f"got the examples of worker {worker}")


def build(config, *, pretrained=True):
    """Assembles the run of `config`; raises ConfigError for any bad input before anything is written.

    `pretrained=False` skips loading backbone weights (a checkpoint will replace them anyway).
    """
    devices = distribute.configure(config)
    source = sources.open_source(config)
    config = sources.with_default_splits(config, source)
    worker = pipeline.Worker(devices.worker_index, devices.num_workers)
    selected = {name: _split(config, source, name) for name in SPLITS}
    cache = _image_cache(config, source, selected.values(), worker)
    splits = {name: _prepare(config, source, worker, cache, name, split) for name, split in selected.items()}
    logging.info(
        "Data: %s, %d classes (%s)", source.name, source.num_classes, ", ".join(source.class_names)
    )
    steps_per_epoch = distribute.agree_on_minimum(devices, pipeline.epoch_steps(
        splits["train"], config.step_batch, devices.num_workers, config.steps_per_epoch
    )) // config.grad_accum_steps * config.grad_accum_steps  # An epoch ends with an update.
    if steps_per_epoch == 0:
        raise ConfigError(
            "batch_size", config.batch_size,
            f"is larger than --train_split={config.train_split} ({splits['train'].count} examples)",
        )

    mode, weights = modes.of_run(config.mode, config.head_epochs), config.weights
    trained_at = trained_image_size(weights, config.backbone) if mode.pretrained and weights != "none" else None
    if not mode.pretrained and weights != "none":
        logging.info("%s mode: the backbone starts from random weights (--weights=%s unused)", mode.name, weights)
        weights = "none"
    elif mode.pretrained and weights == "none":
        logging.warning("--mode=%s with --weights=none: the backbone is random, not pretrained", config.mode)
    elif trained_at not in (None, config.image_size):
        logging.warning(
            "--image_size=%d: the backbone's weights (--weights=%s) were trained at %d px; at another size its "
            "features fit the images less well (set --image_size=%d unless speed matters more)", config.image_size,
            weights, trained_at, trained_at)
    keras.utils.set_random_seed(config.seed)  # Here, after data preparation, which may draw numbers.
    with devices.strategy.scope():
        model = build_classifier(
            backbone=config.backbone, image_size=config.image_size, channels=source.channels,
            num_classes=source.num_classes, alpha=config.alpha, dropout=config.dropout,
            weights="imagenet" if pretrained and weights == "imagenet" else None,
        )
        if pretrained and weights not in ("imagenet", "none"):
            load_backbone_weights(model, weights)
        # The last stage trains the most: the optimizer is built over its variables once.
        trained = trainability.apply(
            model, mode=mode.stage(config.epochs - 1, config.head_epochs).name,
            rule=trainability.Rule.from_config(config), bn=config.bn, bn_momentum=config.bn_momentum,
            lora_rank=config.lora_rank,
        )
        backbone = {id(weight) for weight in model.get_layer(BACKBONE_LAYER).weights}
        optimizer = make_optimizer(
            name=config.optimizer,
            learning_rate=learning_rate_schedule(
                learning_rate=config.learning_rate, schedule=config.lr_schedule,
                warmup_steps=config.warmup_steps,
                total_steps=steps_per_epoch * config.epochs // config.grad_accum_steps,  # In updates.
                accumulation=config.grad_accum_steps,
            ),
            gradient_accumulation_steps=config.grad_accum_steps, ema=config.ema,
            weight_decay=config.weight_decay, precision=devices.precision, variables=trained,
            lr_multipliers={id(w): config.backbone_lr_mult for w in trained if id(w) in backbone},
        )
    state = RunState(
        step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
        epoch_sums=tf.Variable(tf.zeros([3], tf.float64), trainable=False, name="epoch_sums"),
    )
    checkpoints = Checkpoints(
        model=model, optimizer=optimizer, step=state.step, epoch_sums=state.epoch_sums,
        directory=os.path.join(config.model_dir, "checkpoints"), keep=config.keep_checkpoints,
        is_chief=devices.is_chief, worker_index=devices.worker_index,
    )
    return Run(
        config=config, devices=devices, source=source, splits=splits, steps_per_epoch=steps_per_epoch,
        model=model, trained_variables=trained, optimizer=optimizer, state=state, checkpoints=checkpoints,
    )


def trained_image_size(weights, backbone):
    """The image size the backbone weights of `--weights=weights` were trained at, where it is known:
    ImageNet's, the backbone's own size; an earlier run's (its directory, or a file in it), its flags.txt's
    --image_size. None otherwise (a file from elsewhere)."""
    if weights == "imagenet":
        return ARCHITECTURES[backbone].default_image_size
    run = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    try:
        size = read_flagfile(os.path.join(run, "flags.txt")).get("image_size", "")
    except OSError:
        return None
    return int(size) if size.strip().isdigit() else None


def _split(config, source, name):
    """The split of --{name}_split (train, eval, test); None for none."""
    split_name = getattr(config, f"{name}_split")
    return source.split(split_name, f"{name}_split") if split_name else None


def _image_cache(config, source, splits, worker):
    """--cache as pipeline.prepare takes it: memory, none, or a directory (created if needed). Memory only
    within --cache_max_gb, for what the splits' decoded images will take: over it, none, said in the log."""
    if config.cache == "none":
        return config.cache
    if config.cache == "memory":
        pixels = config.image_size * config.image_size * source.channels
        needed = sum(worker.shard_size(split.num_examples) for split in splits if split) * (pixels + 8)
        budget = pipeline.memory_budget(config.cache_max_gb, share=2)
        if needed <= budget:
            return config.cache
        logging.warning(
            "Image cache off: the splits' decoded images would take %.1f GB of memory, over --cache_max_gb (%.1f GB%s); "
            "they are decoded every epoch instead (the same examples, slower; --cache=DIR keeps them in files)",
            needed / 1e9, budget / 1e9, "" if config.cache_max_gb is not None else ": half of this machine's memory")
        return "none"
    try:
        os.makedirs(config.cache, exist_ok=True)
    except OSError as error:
        raise ConfigError("cache", config.cache, f"cannot be created ({error.strerror})") from None
    return config.cache


def _prepare(config, source, worker, cache, name, split):
    """This worker's examples of `split` (of train, eval or test: `name`), decoded and cached; None for none."""
    if split is None:
        return None
    split_name = split.name
    started = time.perf_counter()
    prepared = pipeline.prepare(
        split, image_size=config.image_size, cache=cache, worker=worker,
        deterministic=config.deterministic, max_pixels=config.max_image_pixels,
    )
    if prepared.count == 0:
        raise ConfigError(f"{name}_split", split_name, "has no image that decodes")
    logging.info(
        "%s: %s, %d examples decoded%s in %.1f s", name, split_name, prepared.count,
        "" if cache == "none" else " and cached", time.perf_counter() - started,
    )
    if prepared.skipped:
        logging.warning("%s: %d undecodable examples skipped (or above --max_image_pixels=%d): %s", name,
                        prepared.skipped, config.max_image_pixels, named(prepared.undecodable, prepared.skipped))
    # With several workers a shard may lack a class that the split has: only one worker sees it all.
    if name == "train" and worker.count == 1:
        counts = prepared.class_counts
        if 0 in counts:
            missing = counts.index(0)
            held = source.class_counts(split_name)[missing]  # Before decoding: none at all, or none decoding?
            raise ConfigError("train_split", split_name, f"has no image of class {source.class_names[missing]}"
                              + (" that decodes" if held else " (pick a split that has some, or leave the class out "
                                 "with --label_subset)"))
        few = [f"{source.class_names[label]} ({count})" for label, count in enumerate(counts) if count < FEW_IMAGES]
        if few:
            logging.warning("train: few training images of %s: a class with fewer than %d is learnt poorly (add "
                            "images of it)", named(few), FEW_IMAGES)
    return prepared
