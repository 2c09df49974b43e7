"""README.md and docs/: a short README, links that resolve, a flag reference that cannot go stale, and
flag answers (help, a misspelt flag, a bad value) that come before TensorFlow loads."""

import json
import os
import re
import subprocess
import sys

import pytest

from transfer_engine.engine import config
from helpers import ROOT

README_LIMIT = 12_000  # Bytes: read in five minutes; the reference lives in docs/.


def _pages():
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))


def _anchors(path):
    """GitHub's anchors of a Markdown file's headings: lowercase, punctuation dropped, spaces to hyphens,
    a repeated one numbered."""
    seen, anchors = {}, set()
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def test_readme_is_short_and_links_every_docs_page():
    readme = os.path.join(ROOT, "README.md")
    assert os.path.getsize(readme) <= README_LIMIT, f"README.md is {os.path.getsize(readme):,} bytes"
    with open(readme, encoding="utf-8") as f:
        linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", f.read()))
    assert linked == {os.path.basename(page) for page in _pages()[1:]}, "README's table of docs pages"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in _pages():
        with open(page, encoding="utf-8") as f:
            text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline.
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and anchor not in _anchors(resolved):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_flag_reference_is_what_its_command_writes():
    """docs/flags.md is generated (scripts/flag_reference.py): a flag's help, default or group changed
    without regenerating it fails here."""
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == config.flag_reference(), "docs/flags.md is stale: run python scripts/flag_reference.py"
    listed = re.findall(r"^\| `--(\w+)` \|", committed, re.M)
    assert sorted(listed) == sorted(field.name for field in config.dataclasses.fields(config.Config))
    check = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "flag_reference.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("args, status, line", [
    (["--help"], 0, None),
    (["--helpfull"], 0, None),
    (["--epoch=3"], 2, "error: Unknown command line flag 'epoch'. Did you mean: epochs ?"),
    (["--batch_size=0"], 2, "error: --batch_size=0: must be positive"),
    (["--backbone=vgg99"], 2, "error: --backbone=vgg99: must be one of small_cnn, mobilenet_v2"),
])
def test_flag_answers_come_before_tensorflow_loads(args, status, line):
    """Help and flag errors need neither TensorFlow nor Keras (they took as long as TensorFlow's import,
    4 to 13 s); what only a model can check (layer names, counts) is checked after they load."""
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not {name for name in imported if name.split(".")[0] in ("tensorflow", "keras")}
    errors = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert errors == ([] if line is None else [errors[0]]) and (line is None or errors[0].startswith(line)), errors
    if args == ["--help"]:
        assert "--batch_size=32" in result.stdout and "The data (docs/data.md):" in result.stdout


def _readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    commands = [block or inline for block, inline in  # Shown as a block, or inline in a sentence.
                re.findall(r"^    python launch\.py (.+)$|`python launch\.py ([^`]+)`", readme, re.M)]
    flagfile = re.search(r"^    # my_photos\.flags\n((?:    --.+\n)+)", readme, re.M).group(1)
    return commands, [line.strip() for line in flagfile.splitlines()]


@pytest.mark.longest
@pytest.mark.slow  # Six runs of launch.py, as README shows them (3 to 4 minutes).
def test_readmes_commands_work_as_written(tmp_path):
    """Every `python launch.py` line of README.md, in README's order, from a folder of one's own: the
    placeholders (PATH, my_images/, extra/*.png, /home/me/photos) are real folders of small photos there."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for folder, count in (("photos/red", 12), ("photos/blue", 12), ("my_images", 2), ("extra", 1)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 80, (40 + i, 50, 3), dtype=np.uint8)
            pixels[..., 0 if "red" in folder else 2] += 150
            (tmp_path / folder / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    commands, flagfile = _readme_commands()
    assert commands[0] == "--flagfile=configs/frozen.flags" and len(commands) >= 5, commands
    photos = str(tmp_path / "photos")
    (tmp_path / "my_photos.flags").write_text("\n".join(flagfile).replace("/home/me/photos", photos) + "\n")
    for command in commands:
        args = command.replace("folder:PATH", f"folder:{photos}").split()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        if command == "--flagfile=configs/frozen.flags":
            assert "INFO Done: test accuracy 0.7100, eval accuracy 0.7184," in done.stderr  # What README shows.
    assert (tmp_path / "runs" / "frozen" / "predictions.csv").read_text().count("\n") == 1 + 3
    assert {"model.tflite", "model_int8.tflite", "export.json"} <= set(os.listdir(tmp_path / "runs" / "frozen"))
    assert json.loads((tmp_path / "runs" / "my_photos" / "results.json").read_text())["class_names"] == ["blue", "red"]
