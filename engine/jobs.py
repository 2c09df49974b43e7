"""Jobs (`--job=`): small functions over the same building blocks.

    config -> devices (engine/distribute) -> source and splits (data/) -> classifier, weights and
    trainability (models/) -> optimizer and steps (engine/trainer) -> outer loop (engine/loop) -> run dir
"""

import dataclasses
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from data import pipeline, sources
from engine import benchmark, compare, distribute, feature_cache, loop
from engine.checkpoints import Checkpoints
from engine.config import ConfigError
from engine.run_dir import RunDir
from engine.trainer import Trainer, learning_rate_schedule, make_optimizer, per_example_loss, summarize
from models import trainability
from models.classifier import BACKBONE_LAYER, build_classifier, load_backbone_weights


@dataclasses.dataclass
class Setup:
    """Everything a job needs, built once from the config."""

    config: object
    devices: distribute.Devices
    source: sources.Source
    worker: pipeline.Worker
    train: pipeline.Examples
    eval: pipeline.Examples  # None without --eval_split.
    test: pipeline.Examples  # None without --test_split.
    steps_per_epoch: int
    model: keras.Model
    trained_variables: list  # Every variable the run trains, in any stage.
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable  # Global training steps done.
    epoch_sums: tf.Variable  # The current epoch's (loss, correct, examples) so far.
    checkpoints: Checkpoints
    trainer: Trainer = None  # The current stage's; see trainer_for.
    stage: str = None
    step_model: keras.Model = None  # What the steps run, if not `model`: the head on cached features.

    @property
    def epochs_done(self):
        return int(self.step.numpy()) // self.steps_per_epoch

    def stage_of(self, epoch):
        """The mode that trains `epoch`: a staged finetune run trains the head alone first."""
        return "frozen" if epoch < self.config.head_epochs else self.config.mode

    def trainer_for(self, epoch):
        """The Trainer of `epoch`'s stage. Entering a stage sets what trains and traces its steps once."""
        stage = self.stage_of(epoch)
        if stage != self.stage:
            config = self.config
            variables = trainability.apply(
                self.model, mode=stage, rule=trainability.Rule.from_config(config), bn=config.bn
            )
            if self.stage is not None:
                logging.info("Stage %s from epoch %d: %d variables train", stage, epoch + 1, len(variables))
            self.trainer = Trainer(
                model=self.step_model or self.model, optimizer=self.optimizer, strategy=self.devices.strategy,
                global_batch_size=config.batch_size, variables=variables,
                jit_compile=self.devices.jit_compile, frozen_as_constants=self.devices.frozen_as_constants,
            )
            self.stage = stage
        return self.trainer


def build(config, *, pretrained=True):
    """Builds the whole setup; raises ConfigError for any bad input before anything is written.

    `pretrained=False` skips loading backbone weights (a checkpoint will replace them anyway).
    """
    devices = distribute.configure(config)
    source = sources.open_source(config)
    worker = pipeline.Worker(devices.worker_index, devices.num_workers)
    examples = {}
    for name in ("train", "eval", "test"):
        split_name = getattr(config, f"{name}_split")
        if not split_name:
            examples[name] = None
            continue
        split = source.split(split_name, f"{name}_split")
        started = time.perf_counter()
        prepared = pipeline.prepare(
            split, image_size=config.image_size, cache=_cache_dir(config), worker=worker,
            deterministic=config.deterministic,
        )
        if prepared.count == 0:
            raise ConfigError(f"{name}_split", split_name, "has no image that decodes")
        logging.info(
            "%s: %s, %d examples decoded%s in %.1f s%s", name, split_name, prepared.count,
            "" if config.cache == "none" else " and cached", time.perf_counter() - started,
            f", {prepared.skipped} undecodable skipped" if prepared.skipped else "",
        )
        examples[name] = prepared
    logging.info(
        "Data: %s, %d classes (%s)", source.name, source.num_classes, ", ".join(source.class_names)
    )

    steps_per_epoch = distribute.agree_on_minimum(devices, pipeline.epoch_steps(
        examples["train"], config.batch_size, devices.num_workers, config.steps_per_epoch
    ))
    if steps_per_epoch == 0:
        raise ConfigError(
            "batch_size", config.batch_size,
            f"is larger than --train_split={config.train_split} ({examples['train'].count} examples)",
        )

    weights = config.weights
    if config.mode == "scratch" and weights != "none":
        logging.info("scratch mode: the backbone starts from random weights (--weights=%s unused)", weights)
        weights = "none"
    elif config.mode != "scratch" and weights == "none":
        logging.warning("--mode=%s with --weights=none: the backbone is random, not pretrained", config.mode)
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
            model, mode=config.mode, rule=trainability.Rule.from_config(config), bn=config.bn,
            bn_momentum=config.bn_momentum,
        )
        backbone = {id(weight) for weight in model.get_layer(BACKBONE_LAYER).weights}
        optimizer = make_optimizer(
            name=config.optimizer,
            learning_rate=learning_rate_schedule(
                learning_rate=config.learning_rate, schedule=config.lr_schedule,
                warmup_steps=config.warmup_steps, total_steps=steps_per_epoch * config.epochs,
            ),
            weight_decay=config.weight_decay, precision=devices.precision, variables=trained,
            lr_multipliers={id(w): config.backbone_lr_mult for w in trained if id(w) in backbone},
        )
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch_sums = tf.Variable(tf.zeros([3], tf.float64), trainable=False, name="epoch_sums")
    checkpoints = Checkpoints(
        model=model, optimizer=optimizer, step=step, epoch_sums=epoch_sums,
        directory=os.path.join(config.model_dir, "checkpoints"), keep=config.keep_checkpoints,
        is_chief=devices.is_chief, worker_index=devices.worker_index,
    )
    return Setup(
        config=config, devices=devices, source=source, worker=worker, train=examples["train"],
        eval=examples["eval"], test=examples["test"], steps_per_epoch=steps_per_epoch, model=model,
        trained_variables=trained, optimizer=optimizer, step=step, epoch_sums=epoch_sums,
        checkpoints=checkpoints,
    )


def _cache_dir(config):
    """--cache as pipeline.prepare takes it: memory, none, or a directory that is created if needed."""
    if config.cache in ("memory", "none"):
        return config.cache
    try:
        os.makedirs(config.cache, exist_ok=True)
    except OSError as error:
        raise ConfigError("cache", config.cache, f"cannot be created ({error.strerror})") from None
    return config.cache


def _local_replicas(setup):
    return setup.devices.num_replicas // setup.devices.num_workers


def train_dataset(setup):
    """The distributed training stream, positioned at the checkpointed step."""
    config = setup.config
    first_epoch, done = divmod(int(setup.step.numpy()), setup.steps_per_epoch)

    def dataset_fn(context):
        _check_shard(setup, context)
        return pipeline.train_dataset(
            setup.train, batch_size=context.get_per_replica_batch_size(config.batch_size),
            batches_per_epoch=setup.steps_per_epoch * _local_replicas(setup), seed=config.seed,
            epochs=config.epochs, first_epoch=first_epoch, skip_batches=done * _local_replicas(setup),
            augmentation=config.augment, shuffle_buffer=config.shuffle_buffer,
            deterministic=config.deterministic,
        )

    return setup.devices.strategy.distribute_datasets_from_function(dataset_fn)


def _check_shard(setup, context):
    if (context.input_pipeline_id, context.num_input_pipelines) != (setup.worker.index, setup.worker.count):
        raise RuntimeError(f"input pipeline {context.input_pipeline_id} of {context.num_input_pipelines} "
                           f"got the examples of worker {setup.worker}")


def eval_dataset(setup, examples):
    """The distributed evaluation dataset of `examples` (None for none)."""
    if examples is None:
        return None
    config = setup.config
    steps = pipeline.eval_steps(examples.split, config.batch_size, setup.worker)

    def dataset_fn(context):
        _check_shard(setup, context)
        return pipeline.eval_dataset(
            examples, batch_size=context.get_per_replica_batch_size(config.batch_size), steps=steps,
            local_replicas=_local_replicas(setup), deterministic=config.deterministic,
        )

    return setup.devices.strategy.distribute_datasets_from_function(dataset_fn)


def evaluate_split(setup, examples):
    """Exact loss and accuracy over every example that decoded (None for no examples)."""
    dataset = eval_dataset(setup, examples)
    trainer = setup.trainer or setup.trainer_for(setup.epochs_done)
    return summarize(trainer.evaluate(dataset)) if dataset else None


def class_accuracy(setup, examples):
    """{class name: accuracy} over this worker's `examples` (None for none): where a mode wins."""
    if examples is None:
        return None

    @tf.function(autograph=False)
    def is_correct(images, labels):
        return per_example_loss(labels, (setup.step_model or setup.model)(images, training=False))[1]

    correct = np.zeros(setup.source.num_classes)
    total = np.zeros(setup.source.num_classes)
    for images, labels in examples.dataset.batch(setup.config.batch_size):
        labels_seen = labels.numpy()
        correct += np.bincount(labels_seen, weights=is_correct(images, labels).numpy(), minlength=len(correct))
        total += np.bincount(labels_seen, minlength=len(total))
    return {name: float(c / t) if t else None for name, c, t in zip(setup.source.class_names, correct, total)}


def train(config, *, progress_label=""):
    """Trains (or resumes) a run in --model_dir and writes its results."""
    started = time.time()
    setup = build(config)
    # Other workers write what the chief writes to a directory of their own (TensorFlow's convention).
    run_dir = RunDir(config.model_dir if setup.devices.is_chief else
                     os.path.join(config.model_dir, f"workertemp_{setup.devices.worker_index}"))
    run_dir.check_compatible(config)
    restored = setup.checkpoints.restore()
    run_dir.start(config)
    extraction = None
    why_not = feature_cache.reason_not_to_cache(config)
    if why_not is None:
        setup, extraction = feature_cache.use(setup, eval_dataset)
    elif config.mode == "frozen" and config.feature_cache == "auto":
        logging.info("Feature cache off: %s", why_not)
    if restored:
        logging.info("Resuming from %s (step %d, epoch %d)", restored, int(setup.step.numpy()),
                     setup.epochs_done + 1)
    run_dir.keep_metrics_until(setup.epochs_done)
    setup.checkpoints.watch_preemption(setup.devices.cluster_resolver)
    logging.info(
        "What trains (mode %s%s):\n%s", config.mode,
        f", the head alone for the first {config.head_epochs} epochs" if config.head_epochs else "",
        trainability.format_table(trainability.parameter_table(setup.model, setup.trained_variables)),
    )
    steps = setup.steps_per_epoch
    slow = trainability.slow_batchnorm_momentum(setup.model, steps * config.epochs)
    if slow:
        logging.warning(
            "BatchNorm momentum %g averages its statistics over ~%d steps, but this run has %d: "
            "evaluation will lag training (consider --bn_momentum=0.99)",
            slow, round(1 / (1 - slow)), steps * config.epochs,
        )

    before = trainability.snapshot(setup.model)
    last, throughput = loop.train_epochs(
        setup=setup, run_dir=run_dir, train_dataset=train_dataset(setup),
        eval_dataset=eval_dataset(setup, setup.eval), progress_label=progress_label,
    )
    if not last:  # Nothing left to train: report the last checkpointed epoch.
        last = run_dir.last_metrics()
    test = evaluate_split(setup, setup.test)

    setup.model.save(run_dir.file("model.keras"))
    setup.model.get_layer(BACKBONE_LAYER).save_weights(run_dir.file("backbone.weights.h5"))
    trainable, frozen = trainability.parameter_counts(setup.model, setup.trained_variables)
    results = {
        "job": "train",
        "mode": config.mode,
        "backbone": config.backbone,
        "dataset": config.dataset,
        "class_names": list(setup.source.class_names),
        "global_step": int(setup.step.numpy()),
        "epochs_completed": setup.epochs_done,
        "trainable_params": trainable,
        "non_trainable_params": frozen,
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "eval_loss": last["eval_loss"],
        "eval_accuracy": last["eval_accuracy"],
        "test_loss": test["loss"] if test else None,
        "test_accuracy": test["accuracy"] if test else None,
        "test_examples": test["examples"] if test else None,
        "test_class_accuracy": class_accuracy(setup, setup.test),
        "images_per_sec": throughput.images_per_sec,
        "feature_cache": extraction,
        "skipped_examples": {
            name: examples.skipped for name, examples in (("train", setup.train), ("eval", setup.eval),
                                                          ("test", setup.test)) if examples
        },
        "devices": _describe(setup.devices),
        "trainability_audit": trainability.audit(setup.model, before, setup.trained_variables),
        "wall_seconds": time.time() - started,
    }
    run_dir.write_json("results.json", results)
    logging.info(
        "Done: test accuracy %s, eval accuracy %s, %s images/sec; results in %s",
        _fmt(results["test_accuracy"]), _fmt(results["eval_accuracy"]),
        _fmt(results["images_per_sec"], ".0f"), run_dir.file("results.json"),
    )
    return results


def evaluate(config):
    """Evaluates the latest checkpoint of --model_dir on the eval and test splits."""
    run_dir = RunDir(config.model_dir)
    setup = build(config, pretrained=False)
    restored = setup.checkpoints.restore(model_only=True)
    if not restored:
        raise ConfigError("model_dir", config.model_dir, "has no checkpoint to evaluate")
    evaluation = {"job": "evaluate", "checkpoint": restored}
    for name, examples in (("eval", setup.eval), ("test", setup.test)):
        metrics = evaluate_split(setup, examples)
        for key in ("loss", "accuracy", "examples"):
            evaluation[f"{name}_{key}"] = metrics[key] if metrics else None
    run_dir.write_json("evaluation.json", evaluation)
    logging.info(
        "Evaluated %s: eval accuracy %s, test accuracy %s (%s test examples)",
        restored, _fmt(evaluation["eval_accuracy"]), _fmt(evaluation["test_accuracy"]),
        evaluation["test_examples"],
    )
    return evaluation


def export(config):
    """Writes the trained classifier as a SavedModel for TF Serving: raw uint8 images of any size in,
    logits out (its `serve` function), the preprocessing inside."""
    run_dir = RunDir(config.model_dir)
    source = run_dir.file("model.keras")
    if not os.path.exists(source):
        raise ConfigError("model_dir", config.model_dir, "has no model.keras to export (train it first)")
    target = run_dir.file("saved_model")
    keras.saving.load_model(source).export(target, verbose=False)
    logging.info("Exported %s to %s (signature serving_default: uint8 images -> logits)", source, target)
    return {"job": "export", "saved_model": target}


def _describe(devices):
    return {
        "kind": devices.kind,
        "replicas": devices.num_replicas,
        "strategy": devices.strategy_name,
        "precision": devices.precision,
        "jit_compile": devices.jit_compile,
    }


def _fmt(value, spec=".4f"):
    return "-" if value is None else format(value, spec)


JOBS = {
    "train": train,
    "evaluate": evaluate,
    "export": export,
    "benchmark": benchmark.benchmark,
    "compare": lambda config: compare.compare(config, train),
}
