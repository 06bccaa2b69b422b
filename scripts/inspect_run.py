"""Show what a run saved: the same as `lottery inspect`, for people who run scripts.

    python scripts/inspect_run.py RUN_DIR [--level N] [--json]

(Not named inspect.py: a script's folder comes first on Python's import path, and a file named
inspect.py there would shadow the standard library module that jax imports.)
"""

import sys

from lottery import cli

if __name__ == "__main__":
    sys.exit(cli.main(["inspect", *sys.argv[1:]]))
