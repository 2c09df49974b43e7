"""`--job=inspect`: before (or without) training, what the data holds that would mislead a run.

On the run's data flags and backbone weights, the frozen backbone's pooled features of every example of
every split (the feature cache's extraction, as --mode=frozen computes it), then (engine/maths/inspection.py)
    duplicates.csv      pairs of the same decoded pixels, and near duplicates: features whose cosine
                        similarity (centred on the data's mean) reaches --near_duplicate, within and
                        across splits, most similar first
    suspect_labels.csv  the training examples whose out-of-fold linear prediction contradicts their
                        label, most suspect first (confident learning's ranking)
    inspect.png         the top duplicate pairs and the top suspects, with their labels
    inspect.json        the counts (cross-split pairs among them) and the threshold used
A train run in the same --model_dir on the same data warns when inspect found duplicates across its
splits (their test accuracy counts images it trained on).

The near-duplicate threshold, unless --near_duplicate gives one, comes from the data and the backbone:
each of up to CHANGED_COPIES images is saved again as a JPEG at quality 90 (what a copy of a photo
usually is), and the threshold is the 5th percentile of an image's similarity to its copy: a pair of
images is reported when it is at least as alike as 95% of such copies are. A fixed cosine does not
transfer between backbones and datasets (measured 2026-12-02, docs/trust.md): the copies' 5th percentile
is 0.978 on the shipped Fashion-MNIST sample (2,494 pairs of its 5,189 images reach it) and 0.966 on the
Tux Paint photos with ImageNet EfficientNet-Lite0 (none of 215 do); harsher changes (a 2% border cropped,
half the resolution) put the Fashion-MNIST threshold at 0.65 and 0.72, where millions of its pairs match.
"""

import csv
import dataclasses
import hashlib
import io
import os

from absl import logging
import numpy as np
import tensorflow as tf

from transfer_engine.engine.core import assembly, feature_cache
from transfer_engine.engine.reports import figures
from transfer_engine.engine.maths import inspection
from transfer_engine.engine.core.run_dir import RunDir, write_atomic
from transfer_engine.errors import ConfigError

CHANGED_COPIES = 500
COPY_PERCENTILE = 5
JPEG_QUALITY = 90
MAX_LISTED = 100_000  # duplicates.csv's rows at most (the most similar); inspect.json counts them all.
SHOWN = 8  # Pairs and suspects drawn in inspect.png, each.
FILE = "inspect.json"


def inspect(config):
    """Writes duplicates.csv, suspect_labels.csv, inspect.png and inspect.json in --model_dir."""
    frozen = dataclasses.replace(config, mode="frozen", unfreeze=0, unfreeze_from="", trainable_regex="",
                                 feature_cache="auto")
    run = assembly.build(frozen)
    features = feature_cache.build(run)
    if features is None:
        raise ConfigError("feature_cache_max_gb", config.feature_cache_max_gb,
                          "--job=inspect needs every example's features: raise it, or give --cache=DIR")
    rows, vectors, labels, digests = [], [], [], []
    for name, examples in run.splits.items():
        if examples is None:
            continue
        for index, (image, label) in enumerate(examples.dataset.as_numpy_iterator()):
            rows.append((name, _example_name(run, examples, index)))
            digests.append(hashlib.sha1(image.tobytes()).hexdigest())
            labels.append(int(label))
        for batch, _ in features.splits[name].dataset.batch(4096).as_numpy_iterator():
            vectors.append(batch.reshape(len(batch), -1).astype(np.float32))
    vectors, labels = np.concatenate(vectors), np.array(labels)
    mean = vectors.mean(axis=0)
    threshold = config.near_duplicate or copy_threshold(run, features.cut.lower, mean)
    exact = inspection.exact_duplicates(digests)
    a, b, similarity = inspection.near_duplicates(vectors - mean, threshold)
    digest_of = np.array(digests)
    near = digest_of[a] != digest_of[b]  # The exact pairs are listed as such.
    a, b, similarity = a[near], b[near], similarity[near]
    pairs = exact + [inspection.Pair(int(i), int(j), float(s)) for i, j, s in zip(a[:MAX_LISTED], b[:MAX_LISTED],
                                                                                  similarity[:MAX_LISTED])]
    splits_of = np.array([split for split, _ in rows])
    train = np.flatnonzero([split == "train" for split, _ in rows])
    probabilities = inspection.out_of_fold_probabilities(vectors[train], labels[train], run.source.num_classes)
    suspects = inspection.suspect_labels(probabilities, labels[train])

    run_dir = RunDir(config.model_dir)
    os.makedirs(run_dir.path, exist_ok=True)
    classes = run.source.class_names
    write_atomic(run_dir.file("duplicates.csv"), _csv(
        ["path_a", "split_a", "path_b", "split_b", "similarity"],
        [[rows[p.a][1], _split(run, rows[p.a][0]), rows[p.b][1], _split(run, rows[p.b][0]), f"{p.similarity:.4f}"]
         for p in pairs]))
    write_atomic(run_dir.file("suspect_labels.csv"), _csv(
        ["path", "split", "label", "suggested", "score"],
        [[rows[train[s.index]][1], _split(run, "train"), classes[s.label], classes[s.suggested], f"{s.score:.4f}"]
         for s in suspects]))
    across = {}
    for first, second in [(splits_of[[p.a for p in exact]], splits_of[[p.b for p in exact]]), (splits_of[a], splits_of[b])]:
        for x, y in zip(first, second):
            if x != y:
                key = "-".join(sorted((str(x), str(y))))
                across[key] = across.get(key, 0) + 1
    summary = {
        "job": "inspect", "dataset": run.source.name, "contents": run.source.contents,
        "splits": {name: _split(run, name) for name, examples in run.splits.items() if examples},
        "examples": len(rows), "near_duplicate": threshold,
        "near_duplicate_from": "--near_duplicate" if config.near_duplicate else
        f"the {COPY_PERCENTILE}th percentile of {min(CHANGED_COPIES, len(rows))} images' similarity to a JPEG re-saved copy",
        "exact_pairs": len(exact), "duplicate_pairs": len(exact) + len(a), "listed_pairs": len(pairs), "cross_split_pairs": sum(across.values()), "cross_split": across,
        "suspects_contradicting": sum(s.score > 0 for s in suspects),
    }
    _write_figure(run_dir, run, rows, labels, pairs, [dataclasses.replace(s, index=int(train[s.index])) for s in suspects])
    run_dir.write_json(FILE, summary)
    logging.info(
        "Inspected %d examples: %d duplicate pairs (%d exact), %d across splits%s, near duplicates at cosine >= "
        "%.4f (%s); %d training labels contradicted by the features; see %s and %s", len(rows), summary["duplicate_pairs"],
        summary["exact_pairs"], summary["cross_split_pairs"],
        f" ({', '.join(f'{k} {v}' for k, v in across.items())})" if across else "", threshold,
        summary["near_duplicate_from"], summary["suspects_contradicting"], run_dir.file("duplicates.csv"),
        run_dir.file("suspect_labels.csv"))
    return summary


def copy_threshold(run, lower, mean):
    """The 5th percentile of the centred cosine similarity between images of the data and a copy of each
    saved as a JPEG at quality 90."""
    images = []
    for examples in run.splits.values():
        if examples is not None and len(images) < CHANGED_COPIES:
            images += [image for image, _ in examples.dataset.take(CHANGED_COPIES - len(images)).as_numpy_iterator()]
    images = np.stack(images)

    def changed(image):
        encoded = tf.io.encode_jpeg(image, quality=JPEG_QUALITY)
        return tf.reshape(tf.io.decode_jpeg(encoded, channels=image.shape[-1]), tf.shape(image))

    copies = tf.map_fn(changed, tf.constant(images), fn_output_signature=tf.uint8).numpy()
    batch = run.config.batch_size
    features = [np.concatenate([lower(part[i:i + batch], training=False).numpy().reshape(len(part[i:i + batch]), -1)
                                for i in range(0, len(part), batch)]) - mean for part in (images, copies)]
    unit = [f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) for f in features]
    return float(np.percentile((unit[0] * unit[1]).sum(axis=1), COPY_PERCENTILE))


def warn_if_duplicated(run_dir, config, source):
    """In a train run: the cross-split duplicates that --job=inspect found in this --model_dir on the same
    data and splits, as a warning (test accuracy counts images the run trained on)."""
    found = run_dir.read_json(FILE)
    if not found.get("cross_split_pairs") or found.get("contents") != source.contents:
        return
    splits = {"train": config.train_split, "eval": config.eval_split, "test": config.test_split}
    if any(splits.get(name) != split for name, split in found["splits"].items()):
        return
    logging.warning(
        "--job=inspect found %d duplicate pairs across this run's splits (%s): eval and test accuracy count "
        "images the run trains on; %s lists them", found["cross_split_pairs"],
        ", ".join(f"{k} {v}" for k, v in found["cross_split"].items()), run_dir.file("duplicates.csv"))


def _split(run, name):
    return run.splits[name].split.name


def _example_name(run, examples, index):
    return run.source.example_name(examples.split.name, index)


def _write_figure(run_dir, run, rows, labels, pairs, suspects):
    """inspect.png: the top duplicate pairs (left and right picture each) and the top suspects."""
    shown_pairs, shown_suspects = pairs[:SHOWN], suspects[:SHOWN]
    wanted = {i for p in shown_pairs for i in (p.a, p.b)} | {s.index for s in shown_suspects}
    pictures, offset = {}, 0
    for name, examples in run.splits.items():
        if examples is None:
            continue
        count = sum(1 for split, _ in rows if split == name)
        mine = sorted(i - offset for i in wanted if offset <= i < offset + count)
        if mine:
            for index, (image, _) in enumerate(examples.dataset.take(mine[-1] + 1).as_numpy_iterator()):
                if index in mine:
                    pictures[offset + index] = image
        offset += count
    classes = run.source.class_names
    cells = [(p.a, f"{rows[p.a][0]} · {classes[labels[p.a]]}\n{os.path.basename(str(rows[p.a][1]))[:24]}",
              p.b, f"{rows[p.b][0]} · {classes[labels[p.b]]}\n{os.path.basename(str(rows[p.b][1]))[:24]}\n"
                   f"similarity {p.similarity:.4f}") for p in shown_pairs]
    columns = 4
    rows_drawn = -(-len(cells) // 2) + -(-len(shown_suspects) // 4) or 1
    drawing, axes = figures.new(rows=rows_drawn, columns=columns, figsize=(3 * columns, 3.4 * rows_drawn + 0.6),
                                squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    flat = list(axes.flat)
    slot = 0
    for a, title_a, b, title_b in cells:
        for index, title in ((a, title_a), (b, title_b)):
            _draw(flat[slot], pictures.get(index), title, "darkred" if rows[a][0] != rows[b][0] else "black")
            slot += 1
    slot = -(-slot // 4) * 4
    for suspect in shown_suspects:
        _draw(flat[slot], pictures.get(suspect.index), f"suspect: labelled {classes[suspect.label]}\nlooks like "
              f"{classes[suspect.suggested]} ({suspect.score:+.2f})\n{os.path.basename(str(rows[suspect.index][1]))[:24]}",
              "darkred")
        slot += 1
    drawing.suptitle(figures.printable(f"{run.source.name}: the most similar pairs (red: across splits), then the "
                                       "most suspect labels"), fontsize=10)
    figures.save(run_dir, drawing, "inspect.png", tag="inspect", step=0, dpi=80)


def _draw(axis, picture, title, color):
    if picture is not None:
        axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray" if picture.shape[-1] == 1 else None)
    axis.set_title(figures.printable(title), fontsize=7, color=color)


def _csv(header, rows):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()
