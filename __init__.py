"""transfer-engine: trains image classifiers by transfer learning on TensorFlow 2 (Keras 3) and tf.distribute.

Installed, everything lives under this one name (`transfer_engine.engine`, `.models`, `.data`), so it never
shadows another project's `data` or `models`. The Python API (`transfer_engine.train(...)`, evaluate,
compare, export, predict) is loaded on first use: importing the package alone does not load TensorFlow.
"""

API = ("train", "evaluate", "compare", "export", "predict", "lr_find", "benchmark", "config", "ConfigError", "UsageError")


def __getattr__(name):
    if name in API:
        from transfer_engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'transfer_engine' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(API))
