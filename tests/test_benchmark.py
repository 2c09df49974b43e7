"""engine/benchmark.py: what --job=benchmark measures and writes (figures and their relations, never
speed: timings live in the benchmark itself)."""

import itertools
import json
import types

import pytest

from engine import benchmark


@pytest.mark.slow
def test_benchmark_measures_every_mode_against_fit_the_cache_and_the_pipeline(tiny, pretrained_run, tmp_path,
                                                                               capsys, monkeypatch):
    # The benchmark's clock advances one second per reading: each timed window then lasts exactly one
    # second, and its rate is exactly the images it trained on. (The pipeline's own clock stays real.)
    clock = itertools.count()
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(benchmark, "WINDOWS", 3)
    monkeypatch.setattr(benchmark, "WINDOW_STEPS", 4)
    monkeypatch.setattr(benchmark, "CACHED_WINDOW_STEPS", 6)
    config = tiny(job="benchmark", model_dir=str(tmp_path), weights=pretrained_run, unfreeze=2,
                  train_split="train[:2%]", batch_size=8, steps_per_loop=2)
    report = benchmark.benchmark(config)

    rows = report["rows"]
    assert set(rows) == {
        "scratch", "frozen", "finetune", "frozen, feature cache",
        "pipeline, cache memory", "pipeline, cache none", "pipeline, naive (tutorials)",
    }
    for mode in benchmark.MODES:
        row = rows[mode]
        assert row["images_per_sec"] == row["fit_images_per_sec"] == 4 * 8, (mode, row)
        assert row["engine_over_fit"] == 1.0
        assert row["achieved_gflops"] == pytest.approx(row["training_flops_per_image"] * 32 / 1e9, rel=1e-12)
    assert report["matmul_gflops"] == pytest.approx(2 * 1024**3 * 10 / 1e9, rel=1e-12)
    # Backward work follows what trains: frozen computes no backbone gradients, finetune some.
    flops = {mode: rows[mode]["training_flops_per_image"] for mode in benchmark.MODES}
    assert flops["frozen"] < flops["finetune"] < flops["scratch"], flops
    assert flops["scratch"] > 2 * flops["frozen"], flops  # Backward costs about twice the forward.
    assert rows["scratch"]["trainable_params"] > rows["finetune"]["trainable_params"] > rows["frozen"]["trainable_params"]
    cache = rows["frozen, feature cache"]
    assert cache["images_per_sec"] == 6 * 8
    examples = cache["extraction_images_per_sec"] * cache["extraction_seconds"]
    assert examples == pytest.approx(round(examples)) and round(examples) > 0  # The train split, once.
    assert cache["10_epochs_seconds"] == pytest.approx(cache["extraction_seconds"] + 10 * examples / 48)
    assert cache["10_epochs_fit_seconds"] == pytest.approx(10 * examples / 32)
    ratios = report["ratios"]
    assert ratios["frozen with feature cache / fit frozen, 10 epochs with extraction"] == pytest.approx(
        cache["10_epochs_fit_seconds"] / cache["10_epochs_seconds"])
    assert ratios["frozen / scratch images/sec"] == ratios["finetune / scratch images/sec"] == 1.0
    assert ratios["scratch GFLOP/s / matmul GFLOP/s"] == pytest.approx(
        rows["scratch"]["achieved_gflops"] / report["matmul_gflops"])
    assert ratios["pipeline (cache memory) / fastest mode"] == pytest.approx(
        rows["pipeline, cache memory"]["images_per_sec"] / 32)
    assert [ratios[f"engine / fit, {mode}"] for mode in benchmark.MODES] == [1.0, 1.0, 1.0]
    with open(tmp_path / "benchmark.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "| engine / fit, frozen | 1.00x |" in printed and "| frozen, feature cache (head on features) | 48 |" in printed


def test_flops_of_a_dense_layer_are_counted_exactly():
    """Forward 2*in*out per image, backward (kernel gradient) as much again; the loss adds a little."""
    import keras

    inputs = keras.Input((4, 4, 1), dtype="uint8")
    x = keras.layers.Flatten()(keras.ops.cast(inputs, "float32"))
    model = keras.Model(inputs, keras.layers.Dense(10, use_bias=False)(x))
    flops = benchmark.training_flops_per_image(model, model.trainable_variables, 4, 1)
    assert 2 * (2 * 16 * 10) <= flops < 2 * (2 * 16 * 10) + 200, flops
