"""engine/jobs/benchmark.py: what --job=benchmark measures and writes (figures and their relations, never
speed: timings live in the benchmark itself)."""

import itertools
import json
import types

import pytest

from transfer_engine.engine.jobs import benchmark


@pytest.mark.longest
@pytest.mark.slow
def test_benchmark_measures_every_mode_against_plain_fit_the_caches_and_the_pipeline(tiny, pretrained_run, tmp_path,
                                                                                     capsys, monkeypatch):
    # The benchmark's clock advances one second per reading: each timed window then lasts exactly one
    # second, and its rate is exactly the images it trained on. (The pipeline's own clock stays real.)
    clock = itertools.count()
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    for name, value in (("WINDOWS", 3), ("WINDOW_STEPS", 4), ("CACHED_WINDOW_STEPS", 6), ("HEAVY_WINDOW_STEPS", 1),
                        ("EXTRACTION_WINDOW_BATCHES", 5)):
        monkeypatch.setattr(benchmark, name, value)
    config = tiny(job="benchmark", model_dir=str(tmp_path), weights=pretrained_run, unfreeze=2,
                  train_split="train[:2%]", batch_size=8, steps_per_loop=2)
    report = benchmark.benchmark(config)

    rows = report["rows"]
    assert set(rows) == {
        "scratch", "frozen", "finetune", "frozen, feature cache", "finetune, feature cache", "resnet50 scratch",
        "pipeline, cache memory", "pipeline, cache none", "pipeline, naive (tutorials)",
    }
    one = {"median": 1.0, "min": 1.0, "max": 1.0}
    for mode in benchmark.MODES:
        row = rows[mode]
        assert row["images_per_sec"] == row["plain_fit_images_per_sec"] == row["same_model_fit_images_per_sec"] == 32
        assert row["engine_over_plain_fit"] == row["engine_over_same_model_fit"] == one
        assert row["achieved_gflops"] == pytest.approx(row["training_flops_per_image"] * 32 / 1e9, rel=1e-12)
    # The matmul ceiling is timed in windows alternated with ResNet50's (one each per window).
    assert rows["resnet50 scratch"]["matmul_gflops_windows"] == [pytest.approx(2 * 1024**3 * 10 / 1e9, rel=1e-12)] * 3
    assert report["matmul_gflops"] == pytest.approx(2 * 1024**3 * 10 / 1e9, rel=1e-12)
    # Backward work follows what trains: frozen computes no backbone gradients, finetune some.
    flops = {mode: rows[mode]["training_flops_per_image"] for mode in benchmark.MODES}
    assert flops["frozen"] < flops["finetune"] < flops["scratch"], flops
    assert flops["scratch"] > 2 * flops["frozen"], flops  # Backward costs about twice the forward.
    assert rows["scratch"]["trainable_params"] > rows["finetune"]["trainable_params"] > rows["frozen"]["trainable_params"]
    for mode, cut in (("frozen", "pool"), ("finetune", "block2_pool")):
        cache = rows[f"{mode}, feature cache"]
        assert cache["cut"] == cut and cache["images_per_sec"] == 6 * 8
        assert cache["extraction_images_per_sec"] == 5 * 8  # Five extraction batches of one training batch.
        epoch = cache["10_epochs_plain_fit_seconds"] * 32 / 10
        # No extraction window reaches the split's end (three windows and a priming batch).
        assert epoch == pytest.approx(round(epoch)) and round(epoch) > (3 + 1) * 5 * 8
        assert cache["10_epochs_seconds"] == pytest.approx(epoch / 40 + 10 * epoch / 48)
        assert cache["over_plain_fit"]["median"] == pytest.approx(cache["10_epochs_plain_fit_seconds"]
                                                                  / cache["10_epochs_seconds"])
    assert 0.99 < rows["frozen, feature cache"]["forward_flops_below_cut"] < 1  # All but the head.
    assert 0.2 < rows["finetune, feature cache"]["forward_flops_below_cut"] < 0.9  # Below block 3.
    heavy = rows["resnet50 scratch"]
    assert heavy["images_per_sec"] == 8 and heavy["training_flops_per_image"] > 10 * flops["scratch"]
    ratios = report["ratios"]
    assert ratios["resnet50 scratch GFLOP/s / matmul GFLOP/s"]["median"] == pytest.approx(
        heavy["achieved_gflops"] / report["matmul_gflops"])
    assert ratios["frozen / scratch images/sec"] == ratios["finetune / scratch images/sec"] == one
    assert ratios["scratch GFLOP/s / matmul GFLOP/s"]["median"] == pytest.approx(
        rows["scratch"]["achieved_gflops"] / report["matmul_gflops"])
    assert ratios["pipeline (cache memory) / fastest mode"]["median"] == pytest.approx(
        rows["pipeline, cache memory"]["images_per_sec"] / 32)
    assert [ratios[f"engine / plain fit, {mode}"] for mode in benchmark.MODES] == [one] * 3
    with open(tmp_path / "benchmark.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "| engine / plain fit, frozen | 1.00x | 1.00x | 1.00x |" in printed
    assert "| finetune, feature cache (above block2_pool, on its activations) | 48 |" in printed
    # Which side ran on how many devices: plain fit always on one, the engine and same-model fit on the run's.
    assert ("| measured | engine images/sec (one device) | plain fit images/sec (one device) | engine / plain fit | "
            "fit on the same model images/sec (one device) |") in printed and report["replicas"] == 1


def test_the_tutorials_model_trains_what_the_engine_trains_from_the_same_weights(tiny, pretrained_run, tmp_path):
    """The anchor is the same classifier written the tutorials' way: same weights, same trainable
    variables, same outputs in inference, on images the tutorials' pipeline prepares."""
    import numpy as np

    from transfer_engine.engine.core import assembly
    from transfer_engine.engine.core.steps import Stages

    run = assembly.build(tiny(mode="finetune", unfreeze=2, weights=pretrained_run, model_dir=str(tmp_path),
                              dropout=0.2, eval_split="", test_split=""))
    trainer = Stages(run)(0)
    plain = benchmark.tutorial_model(run, trainer.variables)
    assert sum(int(np.prod(v.shape)) for v in plain.trainable_variables) == sum(
        int(np.prod(v.shape)) for v in trainer.variables)
    images, labels = next(iter(benchmark.tutorial_dataset(run)))
    assert images.shape == (8, 32, 32, 3) and images.dtype == "float32"
    # The tutorials scale in the pipeline (small_cnn: pixels / 255); the engine's model scales inside.
    assert 0.0 <= float(np.min(images)) and float(np.max(images)) <= 1.0
    pixels = next(iter(run.splits["train"].dataset.batch(4)))[0]
    engine = run.model(pixels, training=False)
    scaled = np.repeat(pixels.numpy().astype("float32"), 3, axis=-1) / 255.0
    np.testing.assert_allclose(plain(scaled, training=False), engine, rtol=1e-4, atol=1e-5)


def test_flops_of_a_dense_layer_are_counted_exactly():
    """Forward 2*in*out per image, backward (kernel gradient) as much again; the loss adds a little."""
    import keras

    inputs = keras.Input((4, 4, 1), dtype="uint8")
    x = keras.layers.Flatten()(keras.ops.cast(inputs, "float32"))
    model = keras.Model(inputs, keras.layers.Dense(10, use_bias=False)(x))
    flops = benchmark.training_flops_per_image(model, model.trainable_variables, 4, 1)
    assert 2 * (2 * 16 * 10) <= flops < 2 * (2 * 16 * 10) + 200, flops
