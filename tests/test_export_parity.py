"""--job=export's per-class check (issue 29): each class's accuracy with an artifact beside the Keras
model's, and the classes that lose more than --max_class_drop points, on planted predictions."""

import numpy as np

from transfer_engine.engine.jobs.export import class_accuracy, class_drops, drop_warning, format_table

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress"]


def planted(per_class=20):
    """Labels of `per_class` images a class, and the Keras model's predictions: right but for one image of
    each of the first two classes (taken for the next class)."""
    labels = np.repeat(np.arange(len(NAMES)), per_class)
    keras = labels.copy()
    keras[[0, per_class]] = [1, 2]
    return labels, keras


def check(predicted, labels, keras, max_drop=5.0):
    """class_drops of an artifact that predicts `predicted` where the Keras model predicts `keras`."""
    examples = {name: int(np.sum(labels == index)) for index, name in enumerate(NAMES)}
    return class_drops(class_accuracy(keras, labels, NAMES), class_accuracy(predicted, labels, NAMES),
                       examples, max_drop)


def test_class_accuracy_is_per_class_name_and_leaves_out_a_class_without_test_images():
    labels = np.array([0, 0, 0, 0, 2, 2])  # No Trouser, no Dress.
    predicted = np.array([0, 0, 0, 1, 2, 0])
    assert class_accuracy(predicted, labels, NAMES) == {"T-shirt/top": 0.75, "Pullover": 0.5}


def test_an_artifact_that_breaks_one_class_is_flagged_on_that_class_only():
    """The int8 failure overall agreement hides: every Trouser taken for a Dress, the rest as Keras."""
    labels, keras = planted()
    int8 = np.where(keras == 1, 3, keras)
    assert np.mean(int8 == keras) == 0.75  # 3/4 agreement; per class, one class at 0.
    assert check(int8, labels, keras) == [
        {"class": "Trouser", "keras_accuracy": 0.95, "accuracy": 0.0, "drop": 0.95, "examples": 20}]
    assert check(keras.copy(), labels, keras) == []  # Predictions equal to Keras': nothing flagged.


def test_a_drop_of_exactly_max_class_drop_is_not_flagged_one_more_image_is():
    """One image of a 20-image class is 5 points: that passes the default 5; a second image does not."""
    labels, keras = planted()
    one_more = keras.copy()
    one_more[40] = 0  # A Pullover Keras got right: 1.00 -> 0.95.
    assert check(one_more, labels, keras, max_drop=5.0) == []
    assert [drop["class"] for drop in check(one_more, labels, keras, max_drop=4.9)] == ["Pullover"]
    two_more = one_more.copy()
    two_more[41] = 0  # 1.00 -> 0.90.
    assert check(two_more, labels, keras, max_drop=5.0) == [
        {"class": "Pullover", "keras_accuracy": 1.0, "accuracy": 0.9, "drop": 0.1, "examples": 20}]
    assert check(keras, labels, keras, max_drop=0.0) == []  # 0 flags any drop, and equal accuracy is none.


def test_drops_come_worst_first_and_the_warning_names_five_then_counts_the_rest():
    names = [f"class{index}" for index in range(8)]
    keras_accuracy = dict.fromkeys(names, 1.0)
    accuracy = {name: 0.1 * index for index, name in enumerate(names)}  # class0 loses most.
    drops = class_drops(keras_accuracy, accuracy, dict.fromkeys(names, 20), max_drop=5.0)
    assert [drop["class"] for drop in drops] == names
    line = drop_warning({"format": "litert_int8", "class_drops": drops}, 5.0)
    assert line.startswith("litert_int8: 8 classes lose more than 5 points against the Keras model: "
                           "class0 1.00 -> 0.00 (20 images), class1 1.00 -> 0.10 (20 images), ")
    assert "class4 1.00 -> 0.40 (20 images), and 3 more" in line and "class5" not in line
    assert "\n" not in line
    one = drop_warning({"format": "litert", "class_drops": drops[:1]}, 2.5)
    assert one.startswith("litert: 1 class loses more than 2.5 points against the Keras model: class0 1.00 -> 0.00 ")


def test_the_parity_table_counts_each_artifacts_classes_below():
    labels, keras = planted()
    row = {"format": "litert_int8", "bytes": 1000, "test_accuracy": 0.7, "agreement": 0.75, "max_logit_diff": 1.2,
           "class_drops": check(np.where(keras == 1, 3, keras), labels, keras)}
    header, line = format_table({"keras_test_accuracy": 0.95, "artifacts": [row]}).splitlines()
    column = header.index("classes below")
    assert line[column:].split()[0] == "1"
