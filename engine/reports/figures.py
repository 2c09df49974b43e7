"""Where a run's pictures go: a PNG in the run directory (written atomically) and the same picture as an
image in TensorBoard (logs/test), for confusion.png and top_losses.png."""

import tensorflow as tf

from transfer_engine.engine.core.run_dir import replace_atomic


def new(*, figsize, rows=1, columns=1, layout=None, **options):
    """A matplotlib Figure and its axes (Figure.subplots' `options`), made without pyplot: it needs no
    screen, and switches no backend, so a notebook's own plots still show after a run."""
    from matplotlib.figure import Figure

    drawing = Figure(figsize=figsize, layout=layout)
    return drawing, drawing.subplots(rows, columns, **options)


def printable(text):
    """`text` as a font can draw it: a name that is not UTF-8 (os.listdir's surrogate escapes) gets U+FFFD."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def save(run_dir, drawing, file_name, *, tag, step, dpi=110):
    """Writes `drawing` (a matplotlib figure) as run_dir/file_name and as TensorBoard image `tag` at `step`."""
    path = run_dir.file(file_name)
    replace_atomic(path, lambda temporary: drawing.savefig(temporary, dpi=dpi))
    with open(path, "rb") as f:
        picture = tf.io.decode_png(f.read(), channels=3)
    with tf.summary.create_file_writer(run_dir.file("logs", "test")).as_default(step=step):
        tf.summary.image(tag, picture[None])
