"""Where the kit keeps what it makes for the user when no path is given."""

from __future__ import annotations

import os
from pathlib import Path


def kit_home() -> Path:
    """$DITARKIT_HOME, else ~/.cache/ditarkit."""
    return Path(os.environ.get("DITARKIT_HOME") or Path.home() / ".cache" / "ditarkit")


def default_bundle_dir(precision: str = "fp32") -> Path:
    """The bundle `ditar-export` writes from the embedded default voice, and `ditar-run` uses."""
    return kit_home() / "bundles" / f"default-{precision}"
