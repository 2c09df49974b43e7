"""engine/benchmark.py: what --job=benchmark measures and writes (figures and their relations, never
speed: timings live in the benchmark itself)."""

import json

from engine import benchmark


def test_benchmark_measures_every_mode_against_fit_the_cache_and_the_pipeline(tiny, pretrained_run, tmp_path, capsys):
    config = tiny(job="benchmark", model_dir=str(tmp_path), weights=pretrained_run, unfreeze=2,
                  train_split="train[:2%]", batch_size=8, steps_per_loop=5)
    report = benchmark.benchmark(config)

    rows = report["rows"]
    assert set(rows) == {
        "scratch", "frozen", "finetune", "frozen, feature cache",
        "pipeline, cache memory", "pipeline, cache none", "pipeline, naive (tutorials)",
    }
    assert all(row["images_per_sec"] > 0 for row in rows.values())
    for mode in benchmark.MODES:
        assert rows[mode]["fit_images_per_sec"] > 0
        assert rows[mode]["engine_over_fit"] > 0
    # Backward work follows what trains: frozen computes no backbone gradients, finetune some.
    flops = {mode: rows[mode]["training_flops_per_image"] for mode in benchmark.MODES}
    assert flops["frozen"] < flops["finetune"] < flops["scratch"], flops
    assert flops["scratch"] > 2 * flops["frozen"], flops  # Backward costs about twice the forward.
    assert rows["scratch"]["trainable_params"] > rows["finetune"]["trainable_params"] > rows["frozen"]["trainable_params"]
    assert rows["frozen, feature cache"]["extraction_seconds"] > 0
    assert report["matmul_gflops"] > 0
    assert set(report["ratios"]) >= {
        "engine / fit, scratch", "engine / fit, frozen", "engine / fit, finetune",
        "frozen with feature cache / fit frozen, 10 epochs with extraction",
        "pipeline (cache memory) / fastest mode", "scratch GFLOP/s / matmul GFLOP/s",
    }
    with open(tmp_path / "benchmark.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "| engine / fit, frozen |" in printed and "| frozen, feature cache (head on features) |" in printed


def test_flops_of_a_dense_layer_are_counted_exactly():
    """Forward 2*in*out per image, backward (kernel gradient) as much again; the loss adds a little."""
    import keras

    inputs = keras.Input((4, 4, 1), dtype="uint8")
    x = keras.layers.Flatten()(keras.ops.cast(inputs, "float32"))
    model = keras.Model(inputs, keras.layers.Dense(10, use_bias=False)(x))
    flops = benchmark.training_flops_per_image(model, model.trainable_variables, 4, 1)
    assert 2 * (2 * 16 * 10) <= flops < 2 * (2 * 16 * 10) + 200, flops
