"""What the corpus engines (piper, Kokoro, flite, sox) share: finding a command-line tool, an
ONNX Runtime session on the CPU with a thread count, and per-frame loudness for telling sound
from silence."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from ditarkit.training.sentences import CorpusError

SILENCE_DB = 40.0  # a frame this far below the loudest one is silence
FRAME_SECONDS = 0.01


def require_tool(name: str, package: str) -> str:
    """The path of command `name`, or a one-line fix naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        raise CorpusError(f"`{name}` not found: run `apt-get install {package}`")
    return path


def cpu_session(model: Any, threads: int) -> Any:
    """An onnxruntime CPU session of an in-memory ONNX model with `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def frame_db(audio: np.ndarray, hop: int) -> np.ndarray:
    """Mean power in dB of each whole `hop`-sample frame (none for a clip shorter than one)."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    n = len(x) // hop
    return 10 * np.log10(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
