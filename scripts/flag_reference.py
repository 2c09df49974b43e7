"""Writes docs/flags.md, the flag reference, from engine/config.py's Config (names, defaults, choices, help)
in --help's groups; with --check, exits 1 instead if the committed page differs. Runs without TensorFlow.

    python scripts/flag_reference.py [--check]
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # The checkout is the transfer_engine package (transfer_engine.py).
from transfer_engine.engine import config  # noqa: E402

PAGE = os.path.join(ROOT, "docs", "flags.md")


def main(argv):
    text = config.flag_reference()
    if "--check" in argv[1:]:
        with open(PAGE, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{PAGE} is stale: run python scripts/flag_reference.py", file=sys.stderr)
                return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
