"""engine/core/steps.py: the loss, replica-count invariance, steps_per_loop, mixed precision."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.engine.core import assembly
from transfer_engine.engine.core.optimizer import learning_rate_schedule, make_optimizer
from transfer_engine.engine.core.steps import Trainer, balanced_class_weights, per_example_loss, summarize
from helpers import default_strategy, one_device, replace, train_run, two_devices
from transfer_engine.models import trainability
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(model_dir):
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    return [w.numpy() for w in model.weights]


def test_loss_is_softmax_cross_entropy_or_sigmoid_for_one_logit():
    labels = np.array([0, 2, 1])
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0]], "float32")
    loss, correct = per_example_loss(labels, logits)
    expected = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_array_equal(correct, [1, 1, 1])

    binary_labels = np.array([0, 1, 1])
    binary_logits = np.array([[0.3], [-2.0], [4.0]], "float32")
    loss, correct = per_example_loss(binary_labels, binary_logits)
    expected = keras.losses.binary_crossentropy(binary_labels[:, None].astype("float32"), binary_logits, from_logits=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(correct, [0, 0, 1])


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_moves_the_loss_as_keras_smoothed_losses_do(eps):
    labels = np.array([0, 2, 1])
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0]], "float32")
    loss, correct = per_example_loss(labels, logits, eps)
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps, reduction=None)
    np.testing.assert_allclose(loss, smoothed(np.eye(3)[labels], logits), rtol=1e-6)
    # (1 - eps) x the plain cross-entropy + eps x the mean over classes of -log p.
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    plain = -log_p[np.arange(3), labels]
    np.testing.assert_allclose(loss, (1 - eps) * plain + eps * -log_p.mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(correct, [1, 1, 1])

    binary_labels, binary_logits = np.array([0, 1, 1]), np.array([[0.3], [-2.0], [4.0]], "float32")
    loss, _ = per_example_loss(binary_labels, binary_logits, eps)
    expected = keras.losses.binary_crossentropy(binary_labels[:, None].astype("float32"), binary_logits,
                                                from_logits=True, label_smoothing=eps)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_mixed_labels_are_the_losses_targets_and_accuracy_counts_the_unmixed_labels():
    labels = np.array([0, 2, 1])
    targets = np.array([[0.7, 0.0, 0.3], [0.0, 0.4, 0.6], [0.0, 1.0, 0.0]], "float32")
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0]], "float32")
    for eps in (0.0, 0.2):
        loss, correct = per_example_loss(labels, logits, eps, targets)
        expected = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps, reduction=None)
        np.testing.assert_allclose(loss, expected(targets, logits), rtol=1e-6)
        np.testing.assert_array_equal(correct, [1, 1, 1])
    binary_targets = np.array([[0.2, 0.8], [1.0, 0.0]], "float32")
    loss, correct = per_example_loss(np.array([1, 1]), np.array([[0.3], [-2.0]], "float32"), 0.0, binary_targets)
    expected = keras.losses.binary_crossentropy(binary_targets[:, 1:], np.array([[0.3], [-2.0]]), from_logits=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(correct, [1, 0])


def test_balanced_class_weights_are_inverse_frequency_with_mean_one():
    np.testing.assert_allclose(balanced_class_weights([10, 30]), [1.5, 0.5])
    np.testing.assert_allclose(balanced_class_weights([364, 364, 364]), [1, 1, 1])
    weights = balanced_class_weights([5, 50, 500])
    assert weights.mean() == pytest.approx(1) and weights[0] == pytest.approx(100 * weights[2])


@pytest.mark.parametrize("mixed", [False, True], ids=["labels", "mixed labels"])
@pytest.mark.parametrize("strategy", [default_strategy, two_devices], ids=["1 replica", "2 replicas"])
def test_class_weights_and_smoothing_make_the_step_that_of_the_weighted_smoothed_mean_loss(strategy, mixed):
    """One SGD step of the engine equals lr x the gradient of mean(weight[label] x smoothed loss) over the
    global batch, computed here with a plain GradientTape, for 1 and 2 replicas; with mixed labels
    (--mixup, --cutmix) the loss aims at them and an example's weight is its classes' weights mixed alike."""
    strategy = strategy()
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = build_classifier(backbone="small_cnn", image_size=8, channels=1, num_classes=3, dropout=0.0)
    variables = trainability.apply(model, mode="frozen")  # BatchNorm in inference: replicas see the same model.
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (8, 8, 8, 1)).astype("uint8"), np.array([0, 0, 0, 0, 0, 1, 1, 2])
    weights, eps, lr = balanced_class_weights([5, 2, 1]), 0.2, 0.1
    targets = rng.dirichlet([0.5] * 3, 8).astype("float32") if mixed else None
    with tf.GradientTape() as tape:
        loss, _ = per_example_loss(tf.constant(labels), model(images, training=True), eps, targets)
        objective = tf.reduce_mean(loss * (targets @ weights if mixed else tf.gather(weights, labels)))
    expected = [w.numpy() - lr * g.numpy() for w, g in zip(variables, tape.gradient(objective, variables))]
    with strategy.scope():  # SGD's momentum starts at 0: its first step is lr x the gradient.
        optimizer = make_optimizer(name="sgd", learning_rate=lr, weight_decay=0.0, precision="float32",
                                   variables=variables)
    trainer = Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=8, variables=variables,
                      label_smoothing=eps, class_weights=weights)
    batch = (images, labels, targets) if mixed else (images, labels)
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())
    sums = trainer.train_steps(iter(data), tf.constant(1)).numpy()
    assert sums[0] == pytest.approx(float(objective) * 8, rel=1e-5)  # The reported loss is the objective.
    for variable, value in zip(variables, expected):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-4, atol=1e-6, err_msg=variable.path)


@pytest.mark.slow
def test_one_and_two_replicas_train_the_same_weights(tiny, pretrained_run, tmp_path):
    # BatchNorm in inference (finetune keeps it frozen) and no dropout: each example's gradient is then
    # independent of how the global batch is split, so 1 and 2 replicas must agree.
    weights = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=4, weights=weights, batch_size=8, steps_per_epoch=6, epochs=2)
    runs = {}
    for replicas in (1, 2):
        model_dir = tmp_path / f"replicas{replicas}"
        runs[replicas] = train_run(replace(config, cpu_replicas=replicas), model_dir)
        runs[replicas]["metrics"] = read_metrics(model_dir)
        runs[replicas]["weights"] = final_weights(model_dir)
    for one, two in zip(runs[1]["metrics"], runs[2]["metrics"]):
        np.testing.assert_allclose(one["train_loss"], two["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(one["eval_loss"], two["eval_loss"], rtol=1e-5)
    for one, two in zip(runs[1]["weights"], runs[2]["weights"]):
        np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-6)
    assert runs[1]["global_step"] == runs[2]["global_step"] == 12
    assert runs[2]["devices"]["replicas"] == 2


@pytest.mark.slow
def test_steps_per_loop_gives_the_same_weights_as_single_steps(tiny, tmp_path):
    config = tiny(mode="scratch", steps_per_epoch=6, dropout=0.3)
    one = train_run(replace(config, steps_per_loop=1), tmp_path / "one")
    four = train_run(replace(config, steps_per_loop=4), tmp_path / "four")
    assert one["global_step"] == four["global_step"] == 6
    np.testing.assert_allclose(one["train_loss"], four["train_loss"], rtol=1e-6)
    for a, b in zip(final_weights(tmp_path / "one"), final_weights(tmp_path / "four")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_mixed_float16_scales_the_loss_and_keeps_frozen_weights(tiny, pretrained_run, tmp_path):
    weights = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=2, weights=weights, precision="mixed_float16", steps_per_epoch=4)
    run = assembly.build(replace(config, model_dir=str(tmp_path)))
    assert isinstance(run.optimizer, keras.optimizers.LossScaleOptimizer)
    assert run.model.get_layer(BACKBONE_LAYER).compute_dtype == "float16"

    results = train_run(config, tmp_path / "run")
    assert results["devices"]["precision"] == "mixed_float16"
    assert np.isfinite(results["train_loss"]) and np.isfinite(results["test_loss"])
    assert results["trainability_audit"]["frozen_changed"] == 0
    assert results["trainability_audit"]["trainable_changed"] == results["trainability_audit"]["trainable_variables"]


def _sgd_step_changes(precision, *, gradient_scale=None):
    """{path: change} of one engine step of plain SGD on a small classifier, under `precision`."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_classifier(backbone="small_cnn", image_size=16, channels=1, num_classes=3)
    variables = trainability.apply(model, mode="scratch")
    optimizer = make_optimizer(name="sgd", learning_rate=0.1, weight_decay=0.0, precision=precision,
                               variables=variables)
    trainer = Trainer(model=model, optimizer=optimizer, strategy=tf.distribute.get_strategy(),
                      global_batch_size=8, variables=variables)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensors((rng.integers(0, 256, (8, 16, 16, 1)).astype("uint8"),
                                         rng.integers(0, 3, 8))).repeat()
    before = {w.path: w.numpy().astype("float32") for w in variables}
    trainer.train_steps(iter(data), tf.constant(1))
    return {w.path: w.numpy().astype("float32") - before[w.path] for w in variables}, optimizer


def test_mixed_float16_scales_the_loss_so_updates_match_float32():
    """Under mixed float16 the loss is scaled up before the float16 backward pass and the gradients
    scaled back down by the optimizer: without `scale_loss` every update would come out divided by
    the loss scale (2**15), and small gradients would underflow to 0."""
    float32, _ = _sgd_step_changes("float32")
    mixed, optimizer = _sgd_step_changes("mixed_float16")
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**15, "the step was skipped as non-finite"
    for path, change in float32.items():  # Float16 rounding moves elements, not the step's direction or size.
        a, b = change.ravel(), mixed[path].ravel()
        assert np.linalg.norm(a) > 0, path
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99, path
        assert np.linalg.norm(b) / np.linalg.norm(a) == pytest.approx(1.0, abs=0.03), path


def test_per_class_accuracy_and_the_confusion_matrix_are_exact_across_replicas_and_padding():
    """Evaluation's per-class sums (one home for every metric) equal a plain count over Keras'
    own predictions, for 1 and 2 replicas, with a last batch that needs padding."""
    from transfer_engine.data import pipeline

    keras.utils.set_random_seed(1)
    model = build_classifier(backbone="small_cnn", image_size=8, channels=1, num_classes=3)
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (37, 8, 8, 1)).astype("uint8"), rng.integers(0, 3, 37)
    predicted = np.argmax(model.predict(images, verbose=0), axis=-1)
    expected = {c: float(np.mean(predicted[labels == c] == c)) for c in range(3)}
    examples = pipeline.Examples(split=None, dataset=tf.data.Dataset.from_tensor_slices((images, labels)),
                                 count=37, skipped=0)
    for strategy in (default_strategy(), one_device(), two_devices()):
        replicas = strategy.num_replicas_in_sync
        trainer = Trainer(model=model, optimizer=None, strategy=strategy, global_batch_size=8,
                          variables=model.trainable_variables)
        dataset = strategy.distribute_datasets_from_function(lambda context: pipeline.eval_dataset(
            examples, batch_size=context.get_per_replica_batch_size(8), steps=5, local_replicas=replicas))
        metrics = summarize(trainer.evaluate(dataset), ["a", "b", "c"])
        assert metrics["examples"] == 37
        assert metrics["class_accuracy"] == pytest.approx({"abc"[c]: expected[c] for c in range(3)}, abs=1e-12)
        assert metrics["accuracy"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-12)
        confusion = np.zeros((3, 3), int)
        np.add.at(confusion, (labels, predicted), 1)
        assert metrics["confusion_matrix"] == confusion.tolist()


def test_the_prediction_pass_gives_the_evaluations_figures_in_the_examples_order():
    """engine/reports/predictions.py: one pass keeps every example's logits and loss, in order, on 1 and 2 replicas
    with padding; the loss, accuracy, per-class accuracy and confusion matrix from it are the distributed
    evaluation's (engine/core/steps.py), the numbers train and evaluate reported before the pass."""
    from transfer_engine.data import pipeline
    from transfer_engine.engine.reports.predictions import Predictions, in_order

    keras.utils.set_random_seed(3)
    model = build_classifier(backbone="small_cnn", image_size=8, channels=1, num_classes=3)
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (37, 8, 8, 1)).astype("uint8"), rng.integers(0, 3, 37)
    expected_logits = model.predict(images, verbose=0)
    examples = pipeline.Examples(split=None, dataset=tf.data.Dataset.from_tensor_slices((images, labels)),
                                 count=37, skipped=0)
    for strategy in (default_strategy(), two_devices()):
        replicas = strategy.num_replicas_in_sync
        trainer = Trainer(model=model, optimizer=None, strategy=strategy, global_batch_size=8,
                          variables=model.trainable_variables)
        datasets = [strategy.distribute_datasets_from_function(lambda context: pipeline.eval_dataset(
            examples, batch_size=context.get_per_replica_batch_size(8), steps=5, local_replicas=replicas,
            positions_of=positions)) for positions in (None, pipeline.Worker())]
        evaluated = summarize(trainer.evaluate(datasets[0]), ["a", "b", "c"])
        logits, losses, found, positions = in_order(*trainer.predict(datasets[1]))
        assert positions.tolist() == list(range(37)) and found.tolist() == labels.tolist()
        np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
        predicted = Predictions(name="test", split="x", examples=examples, logits=logits.astype(np.float64),
                                losses=losses.astype(np.float64), labels=found, positions=positions)
        metrics = predicted.metrics(["a", "b", "c"])
        assert {key: metrics[key] for key in ("examples", "accuracy", "class_accuracy", "confusion_matrix")} == {
            key: evaluated[key] for key in ("examples", "accuracy", "class_accuracy", "confusion_matrix")}
        # Per-example float32 losses from two compiled graphs: equal to float32's precision.
        assert metrics["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    # Several workers: worker 1 of 2 numbers its examples 1, 3, 5, ...; its padding -1. Gathered worker after
    # worker, they are put back in the examples' order.
    element = list(pipeline.eval_dataset(examples, batch_size=40, steps=1, positions_of=pipeline.Worker(1, 2)))[0]
    assert element[3].numpy().tolist() == [1 + 2 * i for i in range(37)] + [-1] * 3
    gathered = np.array([0, 2, 4, -1, 1, 3, -1])
    assert [array.tolist() for array in in_order(gathered * 10, gathered)] == [[0, 10, 20, 30, 40], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("strategy", [default_strategy, two_devices], ids=["1 replica", "2 replicas"])
def test_tta_evaluates_the_mean_of_each_images_and_its_mirror_images_logits(strategy):
    from transfer_engine.data import pipeline

    keras.utils.set_random_seed(5)
    model = build_classifier(backbone="small_cnn", image_size=8, channels=1, num_classes=3)
    rng = np.random.default_rng(6)
    images, labels = rng.integers(0, 256, (21, 8, 8, 1)).astype("uint8"), rng.integers(0, 3, 21)
    logits = (model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)) / 2
    assert not np.allclose(logits, model.predict(images, verbose=0), atol=1e-3), "mirroring must matter here"
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy()
    examples = pipeline.Examples(split=None, dataset=tf.data.Dataset.from_tensor_slices((images, labels)),
                                 count=21, skipped=0)
    strategy = strategy()
    replicas = strategy.num_replicas_in_sync
    trainer = Trainer(model=model, optimizer=None, strategy=strategy, global_batch_size=8,
                      variables=model.trainable_variables, tta=True)
    dataset = strategy.distribute_datasets_from_function(lambda context: pipeline.eval_dataset(
        examples, batch_size=context.get_per_replica_batch_size(8), steps=3, local_replicas=replicas))
    metrics = summarize(trainer.evaluate(dataset), ["a", "b", "c"])
    assert metrics["examples"] == 21
    assert metrics["loss"] == pytest.approx(loss.mean(), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)), abs=1e-12)


def test_learning_rate_schedules():
    cosine = learning_rate_schedule(learning_rate=0.1, schedule="cosine", warmup_steps=0, total_steps=100)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(50)) == pytest.approx(0.05)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    warm = learning_rate_schedule(learning_rate=0.1, schedule="constant", warmup_steps=10, total_steps=100)
    assert [round(float(warm(step)), 6) for step in (0, 5, 10, 60, 100)] == [0.0, 0.05, 0.1, 0.1, 0.1]
    assert learning_rate_schedule(learning_rate=0.1, schedule="constant", warmup_steps=0, total_steps=9) == 0.1


@pytest.mark.slow
def test_two_accumulated_half_batches_train_what_one_full_batch_does(tiny, pretrained_run, tmp_path):
    """Same examples per update, same updates (SGD with momentum, a cosine schedule counted in updates):
    the weights agree to float rounding (rtol 1e-5), the accumulated run taking twice the steps."""
    weights = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=4, weights=weights, bn="frozen", dropout=0.0, optimizer="sgd",
                  learning_rate=0.05, lr_schedule="cosine", batch_size=8, epochs=2, steps_per_epoch=6,
                  steps_per_loop=3, feature_cache="off")
    full = train_run(config, tmp_path / "full")
    accumulated = train_run(replace(config, grad_accum_steps=2, steps_per_epoch=12), tmp_path / "accumulated")
    assert accumulated["global_step"] == 2 * full["global_step"] == 24
    assert accumulated["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    for a, b in zip(final_weights(tmp_path / "accumulated"), final_weights(tmp_path / "full")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_balanced_class_weights_raise_the_minority_class_accuracy(tiny, tmp_path, caplog):
    """T-shirts against ten times fewer shirts (the shipped sample's images, as a folder): weighting the
    shirts' loss ten times more makes the model find more of them."""
    from transfer_engine.data import fashion_mnist_idx

    images = fashion_mnist_idx.read_idx(fashion_mnist_idx.sample_paths("validation")[0], 2051, None)
    labels = fashion_mnist_idx.read_idx(fashion_mnist_idx.sample_paths("validation")[1], 2049, None)
    for name, label, count in (("shirt", 6, 40), ("tshirt", 0, 400)):
        os.makedirs(tmp_path / "images" / name)
        for i, image in enumerate(images[labels == label][:count]):
            (tmp_path / "images" / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    config = tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=(), image_size=28, train_split="train",
                  eval_split="", test_split="train", epochs=3, batch_size=16, learning_rate=0.003, bn_momentum=0.9)
    accuracy = {}
    for weighting in ("none", "balanced"):
        with caplog.at_level("INFO"):
            results = train_run(replace(config, class_weight=weighting), tmp_path / weighting)
        accuracy[weighting] = results["test_class_accuracy"]
    assert "Class weights (balanced, from the train split's 40/400 examples per class): shirt 1.818, tshirt 0.182" in caplog.text
    assert accuracy["balanced"]["shirt"] > accuracy["none"]["shirt"] + 0.1, accuracy
    assert accuracy["balanced"]["tshirt"] < accuracy["none"]["tshirt"], accuracy  # The price: the majority's.


@pytest.mark.parametrize("strategy", [default_strategy, two_devices], ids=["1", "2"])
def test_ema_evaluates_with_the_moving_averages_and_then_restores_the_trained_weights(strategy):
    strategy = strategy()
    with strategy.scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        optimizer = make_optimizer(name="sgd", learning_rate=0.1, weight_decay=0.0, precision="float32",
                                   variables=model.trainable_variables, ema=0.5)
    trainer = Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=4,
                      variables=model.trainable_variables)
    images = np.random.default_rng(0).normal(size=[8, 4]).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    train = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((images, labels)).batch(4))
    values = [[w.numpy() for w in model.trainable_variables]]
    iterator = iter(train)
    for _ in range(2):
        trainer.train_steps(iterator, tf.constant(1))
        values.append([w.numpy() for w in model.trainable_variables])
    # Keras' EMA: the first update's weights, then 0.5 x average + 0.5 x the second update's.
    averages = [0.5 * first + 0.5 * second for first, second in zip(values[1], values[2])]
    evaluation = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((images, labels, np.ones(8, "float32"))).batch(4))
    loss = summarize(trainer.evaluate(evaluation))["loss"]
    for weight, value in zip(model.trainable_variables, averages):
        weight.assign(value)
    expected = keras.losses.sparse_categorical_crossentropy(labels, model(images), from_logits=True)
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
    for weight, value in zip(model.trainable_variables, values[2]):
        weight.assign(value)
    with strategy.scope():  # Evaluation left the trained weights, not the averages, in place.
        trainer.evaluate(evaluation)
    for weight, value in zip(model.trainable_variables, values[2]):
        np.testing.assert_array_equal(weight.numpy(), value)
    assert not np.allclose(values[1][0], values[2][0])


@pytest.mark.slow
def test_ema_run_saves_and_tests_the_averaged_weights_and_leaves_frozen_weights_alone(tiny, pretrained_run, tmp_path):
    config = tiny(mode="finetune", weights=pretrained_run, unfreeze=2, ema=0.9, epochs=2, steps_per_epoch=5,
                  feature_cache="off")
    results = train_run(config, tmp_path / "run")
    assert results["trainability_audit"]["frozen_changed"] == 0
    run = assembly.build(replace(config, model_dir=str(tmp_path / "run")), pretrained=False)
    run.checkpoints.restore()
    saved = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    saved_by_path = {weight.path: weight.numpy() for weight in saved.weights}
    inner = run.optimizer
    for variable in run.trained_variables:  # model.keras holds each trained weight's average, not its value.
        average = inner._model_variables_moving_average[inner._get_variable_index(variable)].numpy()
        np.testing.assert_array_equal(saved_by_path[variable.path], average)
        assert not np.array_equal(average, variable.numpy()), variable.path
    trained = {id(variable) for variable in run.trained_variables}
    for variable in run.model.weights:  # Frozen weights are not averaged: saved as they are.
        if id(variable) not in trained and not variable.path.endswith(("moving_mean", "moving_variance")):
            np.testing.assert_array_equal(saved_by_path[variable.path], variable.numpy())
    # The reported test is the saved model's.
    for weight in run.model.weights:
        weight.assign(saved_by_path[weight.path])
    plain = Trainer(model=run.model, optimizer=keras.optimizers.SGD(), strategy=run.devices.strategy,
                    global_batch_size=8, variables=[])
    assert summarize(plain.evaluate(run.eval_dataset(run.splits["test"])))["accuracy"] == results["test_accuracy"]


def _assert_the_replicas_skipped_together(weights, scales, initial):
    for path, replicas in weights.items():
        assert np.all(np.isfinite(replicas)), f"{path} took another replica's overflow"
        for other in replicas[1:]:
            np.testing.assert_array_equal(replicas[0], other, err_msg=f"{path} differs across replicas")
    assert scales == [initial / 2] * len(scales), scales


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_an_overflow_on_one_replica_makes_every_replica_skip_the_step_and_halve_the_scale(jit_compile):
    """Keras 3's LossScaleOptimizer judges each replica's own gradients; with merge_call the first replica's
    finite ones decided, and the second's inf was summed into every weight."""
    from helpers import step_with_an_overflow_on_one_replica

    _assert_the_replicas_skipped_together(*step_with_an_overflow_on_one_replica(two_devices(), jit_compile))


@pytest.mark.slow
def test_xla_on_several_gpus_trains_and_skips_an_overflow_together():
    """On GPUs, tf.distribute runs an XLA replica function without merge_call; the optimizer's updates
    (its `iterations`, the loss scale's cond) need merge_call, so XLA around the whole replica step failed
    there even in float32 ("merge_call called while defining a new graph"). Simulated in a subprocess."""
    from helpers import on_two_simulated_gpus

    weights, scales, initial = on_two_simulated_gpus(
        "from helpers import step_with_an_overflow_on_one_replica\n"
        "print(json.dumps(step_with_an_overflow_on_one_replica(strategy, jit_compile=True)))"
    )
    _assert_the_replicas_skipped_together(weights, scales, initial)
    trained = on_two_simulated_gpus(
        "import keras, numpy as np\n"
        "from transfer_engine.engine.core.optimizer import make_optimizer\n"
        "from transfer_engine.engine.core.steps import Trainer\n"
        "with strategy.scope():\n"
        "    keras.utils.set_random_seed(1)\n"
        "    inputs = keras.Input((3,))\n"
        "    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))\n"
        "    optimizer = make_optimizer(name='adam', learning_rate=0.1, weight_decay=0.0, precision='float32',\n"
        "                               variables=model.trainable_weights)\n"
        "trainer = Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=4,\n"
        "                  variables=model.trainable_weights, jit_compile=True)\n"
        "batch = tf.data.Dataset.from_tensors((np.eye(4, 3, dtype='float32'), np.array([0, 1, 0, 1]))).repeat()\n"
        "trainer.train_steps(iter(strategy.experimental_distribute_dataset(batch)), tf.constant(3))\n"
        "local = strategy.experimental_local_results\n"
        "print(json.dumps([int(optimizer.iterations.numpy())] + [v.numpy().tolist() for w in model.weights\n"
        "                                                        for v in local(w.value)]))"
    )
    iterations, *replicas = trained
    assert iterations == 3
    for first, second in zip(replicas[::2], replicas[1::2]):
        assert first == second and np.all(np.isfinite(first))



def test_batchnorm_moving_statistics_agree_across_replicas():
    """Each replica updates its BatchNorm statistics from its own half of the batch; after a training call
    they hold the same values, the mean of the replicas' (what one replica would average from the whole)."""
    strategy = two_devices()
    with strategy.scope():
        keras.utils.set_random_seed(2)
        model = build_classifier(backbone="small_cnn", image_size=8, channels=1, num_classes=3)
        variables = trainability.apply(model, mode="scratch")
        optimizer = make_optimizer(name="sgd", learning_rate=0.01, weight_decay=0.0, precision="float32",
                                   variables=variables)
    trainer = Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=8, variables=variables)
    rng = np.random.default_rng(3)  # The two halves differ: dark images on one replica, bright on the other.
    images = np.concatenate([rng.integers(0, 60, (4, 8, 8, 1)), rng.integers(180, 256, (4, 8, 8, 1))]).astype("uint8")
    batch = tf.data.Dataset.from_tensors((images, np.array([0, 1, 2, 0, 1, 2, 0, 1]))).repeat()
    trainer.train_steps(iter(strategy.experimental_distribute_dataset(batch)), tf.constant(3))
    statistics = [layer.moving_mean for layer in trainability.all_layers(model)
                  if isinstance(layer, keras.layers.BatchNormalization)]
    assert statistics
    for statistic in statistics:
        first, second = (value.numpy() for value in strategy.experimental_local_results(statistic.value))
        np.testing.assert_array_equal(first, second, err_msg=statistic.path)
        assert np.any(first != 0), statistic.path


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(mode="scratch", label_smoothing=0.1, class_weight="balanced", mixup=0.2, cutmix=1.0, ema=0.9,
         optimizer="adamw", weight_decay=1e-4, fused_batchnorm="true"),
    dict(mode="finetune", unfreeze=3, bn="train", backbone_lr_mult=0.5, fused_batchnorm="false"),  # Cached below.
    dict(mode="lora", lora_rank=2),
], ids=["scratch-every-loss-option", "finetune-feature-cache", "lora"])
def test_the_steps_compile_with_xla_under_mixed_float16_with_every_option(tiny, pretrained_run, tmp_path, options):
    """What a GPU runs: any op XLA cannot compile, or a float16/float32 mismatch, shows up here first."""
    from tensorflow.python.framework import config as tf_config  # Op determinism is process-wide: off here.

    weights = pretrained_run if options["mode"] != "scratch" else "none"
    config = tiny(jit_compile="true", precision="mixed_float16", weights=weights, epochs=2, steps_per_epoch=3,
                  deterministic=False, **options)
    was_deterministic = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    try:
        results = train_run(config, tmp_path / "run")
    finally:
        if was_deterministic:
            tf.config.experimental.enable_op_determinism()
    assert results["devices"]["precision"] == "mixed_float16" and results["devices"]["jit_compile"]
    assert np.isfinite(results["train_loss"]) and np.isfinite(results["test_loss"])
    assert results["trainability_audit"]["frozen_changed"] == 0
    assert (results["feature_cache"] is not None) == (options["mode"] == "finetune")


@pytest.mark.slow
def test_a_two_replica_scratch_run_saves_the_batchnorm_statistics_it_evaluated_with(tiny, tmp_path):
    """model.keras (the first replica's variables) gives the test loss and accuracy the run reported."""
    from transfer_engine.data import pipeline, sources

    config = tiny(cpu_replicas=2, epochs=2, bn_momentum=0.5)
    results = train_run(config, tmp_path / "run")
    assert results["devices"]["replicas"] == 2
    model = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    examples = pipeline.prepare(sources.open_source(config).split(config.test_split, "test_split"),
                                image_size=config.image_size)
    images, labels = (np.concatenate(part) for part in zip(*examples.dataset.batch(64).as_numpy_iterator()))
    logits = model.predict(images, verbose=0)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy().mean()
    assert results["test_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert results["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)), abs=1e-9)


def test_evaluation_reports_plain_cross_entropy_whatever_the_training_loss():
    """--label_smoothing and --class_weight shape the training loss only: eval and test report the plain
    cross-entropy, comparable across runs."""
    from transfer_engine.data import pipeline

    keras.utils.set_random_seed(1)
    model = build_classifier(backbone="small_cnn", image_size=8, channels=1, num_classes=3)
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (16, 8, 8, 1)).astype("uint8"), rng.integers(0, 3, 16)
    plain = float(np.mean(keras.losses.sparse_categorical_crossentropy(
        labels, model.predict(images, verbose=0), from_logits=True)))
    examples = pipeline.Examples(split=None, dataset=tf.data.Dataset.from_tensor_slices((images, labels)),
                                 count=16, skipped=0)
    strategy = default_strategy()
    trainer = Trainer(model=model, optimizer=None, strategy=strategy, global_batch_size=8,
                      variables=model.trainable_variables, label_smoothing=0.3, class_weights=[5.0, 1.0, 0.2])
    dataset = strategy.distribute_datasets_from_function(lambda context: pipeline.eval_dataset(
        examples, batch_size=8, steps=2, local_replicas=1))
    assert summarize(trainer.evaluate(dataset))["loss"] == pytest.approx(plain, rel=1e-5)
