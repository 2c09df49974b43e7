"""api.py, the Python API: the flags as keywords with the CLI's messages, jobs returning their results, and
predict on numpy arrays agreeing with predict on files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import transfer_engine as te
from helpers import ROOT, launch_in_process, tiny_flags


def _flag_values(config):
    """A tiny config as API keywords (its flagfile lines, --name=value)."""
    return dict(line[2:].split("=", 1) for line in tiny_flags(config) if "=" in line)


@pytest.mark.parametrize("keywords, flags", [
    ({"epochs": 0}, ["--epochs=0"]),
    ({"epochz": 1}, ["--epochz=1"]),
    ({"mode": "frozen", "weights": "/no/such.weights.h5"}, ["--mode=frozen", "--weights=/no/such.weights.h5"]),
    ({"batch_size": "eight"}, ["--batch_size=eight"]),
    ({"flagfile": "/no/such.flags"}, ["--flagfile=/no/such.flags"]),
])
def test_a_bad_value_raises_value_error_with_the_cli_message(tiny, tmp_path, keywords, flags):
    base = _flag_values(tiny(model_dir=str(tmp_path / "run")))
    status, printed = launch_in_process(*[f"--{k}={v}" for k, v in base.items()], *flags)
    assert status == 2
    with pytest.raises(ValueError) as raised:
        te.train(**{**base, **keywords})
    assert printed.strip().splitlines()[-1] == f"error: {raised.value}"
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_train_returns_the_results_it_wrote_and_keywords_take_python_values(tiny, tmp_path):
    config = tiny(model_dir=str(tmp_path / "run"))
    keywords = {**_flag_values(config), "label_subset": (6, 0, 2), "deterministic": True, "epochs": 1}
    import matplotlib

    matplotlib.use("svg")  # A notebook's backend: a run draws its pictures without switching it.
    try:
        results = te.train(**keywords)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use("Agg")
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["class_names"] == ["Shirt", "T-shirt/top", "Pullover"]
    assert te.config(**keywords) == config
    # The run is a row of TensorBoard's HParams table: its flags, and its metrics as columns.
    from helpers import hparams_rows

    (hparams, scalars), = hparams_rows(tmp_path).values()
    assert hparams["learning_rate"] == pytest.approx(config.learning_rate) and hparams["label_subset"] == "6,0,2"
    assert hparams["deterministic"] is True and "model_dir" not in hparams
    assert scalars[("run/logs/test", "accuracy")] == pytest.approx(results["test_accuracy"])


def test_predict_on_arrays_gives_what_predict_on_files_gives(pretrained_run, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)  # Other size and channels than the run's.
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"{index}.png"))
        tf.io.write_file(paths[-1], tf.io.encode_png(image))
    on_files = te.predict(pretrained_run, paths, top_k=3, output=str(tmp_path / "predictions.csv"))
    on_arrays = te.predict(pretrained_run, images, top_k=3)
    assert [row["path"] for row in on_files] == paths
    assert len(on_arrays) == 5
    for file_row, array_row in zip(on_files, on_arrays):
        assert file_row["classes"] == array_row["classes"]
        np.testing.assert_allclose(file_row["probabilities"], array_row["probabilities"], rtol=1e-6)
        assert sorted(array_row["classes"]) == ["Pullover", "Shirt", "T-shirt/top"]
    one = te.predict(pretrained_run, images[0], top_k=3)
    assert one == on_arrays[:1]
    assert te.predict(pretrained_run, images.tolist(), top_k=3) == on_arrays  # Nested lists of pixels.
    gray = images[..., 0]  # [N, H, W]: Fashion-MNIST's shape, gray images.
    assert te.predict(pretrained_run, gray, top_k=3) == te.predict(pretrained_run, gray[..., None], top_k=3)
    with pytest.raises(ValueError, match=r"^--images=5x40x40x3 float64: must hold integer pixel values 0 to 255"):
        te.predict(pretrained_run, images / 255.0)


@pytest.mark.slow
def test_importing_the_package_loads_no_tensorflow():
    """So --help and scripts that only import it stay fast; the API loads it on first use."""
    code = "import sys, transfer_engine; print('tensorflow' in sys.modules, callable(transfer_engine.train))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["False", "True"], done.stderr


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = readme.split("### Installed, and from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "PYTHONPATH": ROOT}  # This checkout's transfer_engine, whatever is installed.
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy, predicted, refused = done.stdout.strip().splitlines()
    results = json.loads((tmp_path / "runs" / "api_frozen" / "results.json").read_text())
    assert accuracy == f"test accuracy {results['test_accuracy']:.4f}" and results["epochs_completed"] == 3
    assert predicted.startswith("[{'answer': '") and refused == "--epochs=0: must be positive"
    assert " INFO Done: test accuracy " in done.stderr  # The command's log lines, from the API too.


NOTEBOOK_EPOCHS = "epochs=4, head_epochs=2"


@pytest.mark.longest
@pytest.mark.slow
def test_the_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """examples/transfer_learning.ipynb in a Jupyter kernel, as a user opens it (in a folder of their own)."""
    import nbclient
    import nbformat

    monkeypatch.setenv("PYTHONPATH", ROOT)  # The kernel imports this checkout's transfer_engine.
    notebook = nbformat.read(os.path.join(ROOT, "examples", "transfer_learning.ipynb"), as_version=4)
    # As written but shorter: what it proves (every mode trains, is tabulated, drawn, audited and predicts)
    # needs no more than an epoch per stage of a few steps, on part of the test split.
    [cell] = [cell for cell in notebook.cells if "te.compare(" in cell.source]
    assert NOTEBOOK_EPOCHS in cell.source, cell.source
    cell.source = cell.source.replace(NOTEBOOK_EPOCHS, "epochs=2, head_epochs=1, steps_per_epoch=2, "
                                                      "eval_split='validation[:64]', test_split='test[:64]'")
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) == 2, [output.get("output_type") for output in outputs]  # The curves, the predictions.
    accuracies = next(output for output in outputs if output.get("output_type") == "execute_result")
    assert set(eval(accuracies["data"]["text/plain"])) == {"scratch", "frozen", "finetune", "staged", "lora"}
    audit = "".join(output.get("text", "") for output in outputs if output.get("name") == "stdout")
    assert audit.count("frozen weights changed: 0") == 5
