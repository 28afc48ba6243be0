"""A module that records being imported: no task message may ever make a worker import it."""

import os
from pathlib import Path

Path(os.environ["RECORDED_IMPORT_FILE"]).write_text(f"imported by pid {os.getpid()}\n")


def run() -> str:
    return "should never run"
