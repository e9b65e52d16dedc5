"""What fastforget prints for its user: once per run, whatever its world size."""
from __future__ import annotations

import os
import sys


def main_process() -> bool:
    """Rank 0 of a torchrun job, or a process that torchrun did not start."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str, *, err: bool = False) -> None:
    """Prints message (stderr with err) on the main process only: every rank meets the same events."""
    if main_process():
        print(message, file=sys.stderr if err else sys.stdout, flush=True)
