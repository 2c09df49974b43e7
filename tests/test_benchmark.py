"""engine/benchmark.py: what --job=benchmark measures and writes (figures, not speed, are checked)."""

import json

from engine import benchmark


def test_benchmark_reports_the_pipeline_against_the_naive_form(tiny, tmp_path, capsys):
    config = tiny(model_dir=str(tmp_path), train_split="test[:200]", batch_size=8)
    report = benchmark.benchmark(config)
    assert set(report["rows"]) == {
        "pipeline, cache memory", "pipeline, cache none", "pipeline, naive (tutorials)"
    }
    assert all(row["images_per_sec"] > 0 for row in report["rows"].values())
    with open(tmp_path / "benchmark.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "| pipeline cache memory / naive |" in printed
