"""`--job=inspect` (issue 29, WIP, untested): before or without training, the frozen backbone's pooled
features of every example of every split (the feature cache's extraction, with --mode=frozen), then
duplicate pairs within and across splits and suspect labels (engine/inspection.py), written to
duplicates.csv, suspect_labels.csv and inspect.json in --model_dir."""

import csv
import dataclasses
import hashlib
import io
import os

from absl import logging
import numpy as np

from transfer_engine.engine import assembly, feature_cache, inspection
from transfer_engine.engine.run_dir import RunDir, write_atomic

NEAR_THRESHOLD = 0.97  # To be justified on real photos (a re-encoded or resized copy vs two shots of one thing).


def inspect(config):
    run = assembly.build(dataclasses.replace(config, mode="frozen", unfreeze=0, unfreeze_from="", trainable_regex=""))
    features = feature_cache.build(run)
    if features is None:
        raise RuntimeError("the frozen backbone's features could not be cached")
    rows, vectors, labels, digests = [], [], [], []
    for name, examples in run.splits.items():
        if examples is None:
            continue
        for index, (image, label) in enumerate(examples.dataset.as_numpy_iterator()):
            rows.append((name, run.source.example_name(examples.split.name, index)))
            digests.append(hashlib.sha1(image.tobytes()).hexdigest())
            labels.append(int(label))
        for batch, _ in features.splits[name].dataset.batch(4096).as_numpy_iterator():
            vectors.append(batch.reshape(len(batch), -1))
    vectors = np.concatenate(vectors)
    if os.environ.get("INSPECT_DUMP"):  # WIP: features for choosing the threshold.
        np.savez(os.environ["INSPECT_DUMP"], vectors=vectors, labels=np.array(labels), digests=np.array(digests),
                 splits=np.array([split for split, _ in rows]))
    pairs = inspection.exact_duplicates(digests) + [
        pair for pair in inspection.near_duplicates(vectors, NEAR_THRESHOLD) if digests[pair.a] != digests[pair.b]]
    train = [i for i, (split, _) in enumerate(rows) if split == "train"]
    probabilities = inspection.out_of_fold_probabilities(vectors[train], np.array(labels)[train], run.source.num_classes)
    suspects = inspection.suspect_labels(probabilities, np.array(labels)[train])
    run_dir = RunDir(config.model_dir)
    os.makedirs(run_dir.path, exist_ok=True)
    classes = run.source.class_names
    write_atomic(run_dir.file("duplicates.csv"), _csv(
        ["path_a", "split_a", "path_b", "split_b", "similarity"],
        [[rows[p.a][1], rows[p.a][0], rows[p.b][1], rows[p.b][0], f"{p.similarity:.4f}"] for p in pairs]))
    write_atomic(run_dir.file("suspect_labels.csv"), _csv(
        ["path", "split", "label", "suggested", "score"],
        [[rows[train[s.index]][1], "train", classes[s.label], classes[s.suggested], f"{s.score:.4f}"] for s in suspects]))
    across = sum(rows[p.a][0] != rows[p.b][0] for p in pairs)
    summary = {"job": "inspect", "examples": len(rows), "duplicate_pairs": len(pairs), "cross_split_pairs": across,
               "near_threshold": NEAR_THRESHOLD, "suspects_contradicting": sum(s.score > 0 for s in suspects)}
    run_dir.write_json("inspect.json", summary)
    logging.info("Inspected %d examples: %d duplicate pairs (%d across splits), %d training labels contradicted by "
                 "the features; see %s", len(rows), len(pairs), across, summary["suspects_contradicting"],
                 run_dir.file("duplicates.csv"))
    return summary


def _csv(header, rows):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()
