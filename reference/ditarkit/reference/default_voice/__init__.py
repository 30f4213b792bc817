"""The embedded default voice: a small DiTAR trained offline by this project (see
training/). Its checkpoint files sit beside this module when it has been trained."""

from __future__ import annotations

from pathlib import Path

from ditarkit.reference.checkpoint import CONFIG_FILE, WEIGHTS_FILE

DIRECTORY = Path(__file__).parent


def default_checkpoint() -> Path | None:
    """The shipped checkpoint folder, or None while no trained default voice is shipped."""
    present = (DIRECTORY / CONFIG_FILE).is_file() and (DIRECTORY / WEIGHTS_FILE).is_file()
    return DIRECTORY if present else None
