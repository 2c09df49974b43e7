"""What must happen before TensorFlow loads, without loading it: TensorFlow's process defaults, and absl's
flag-file lookup. Every package of the project imports this module first (engine/, models/, data/
__init__.py), so no import order can load TensorFlow before its defaults are set; launch.py parses and
validates flags with this alone, so `--help` and a bad flag answer before TensorFlow loads (internals.py
loads it, after importing this).

Relies on absl-py's `FlagValues._get_flag_file_lines` (private; checked with absl-py 2.x), the one library
internal here; internals.py holds the others.
"""

import os
import platform

# --- TensorFlow's process defaults, read once when its native library loads --------------------------
# A variable the user set wins.
# - TF_CPP_MIN_LOG_LEVEL=2 keeps TensorFlow's C++ start-up chatter out.
# - TF_ENABLE_ONEDNN_OPTS=1 on x86-64: TensorFlow's pip build turns its oneDNN CPU kernels on by default
#   only on CPUs with AVX-512 VNNI/BF16 or AMX and uses Eigen's elsewhere; on this AVX2 CPU, oneDNN made
#   the scratch training step 1.8x faster, its BatchNorm kernels most of all (docs/performance.md).
#   TF_ENABLE_ONEDNN_OPTS=0 gives Eigen's kernels back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def resolve_flagfiles(flag_values, resolve):
    """Makes absl open every --flagfile path (a nested one too) as `resolve(path)` says: absl reads them
    relative to the working directory only, and has no public hook (FlagValues._get_flag_file_lines)."""
    read = type(flag_values)._get_flag_file_lines

    def resolved(filename, *args, **kwargs):
        return read(flag_values, resolve(filename), *args, **kwargs)

    object.__setattr__(flag_values, "_get_flag_file_lines", resolved)  # FlagValues' own setattr sets flags.
