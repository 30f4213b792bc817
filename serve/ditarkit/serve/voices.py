"""Registered voices: the VAE latents of a reference, kept on disk by id.

Each Triton model instance is its own process (the python backend runs one stub per
instance), so `register_voice` and every instance of `ditar` share voices through a folder:
written atomically by one, read by the others. Voices are kept per bundle (a folder named by
the digest of its manifest), so an id never resolves to latents of another model.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.manifest import MANIFEST_FILE
from ditarkit.serve.protocol import UnknownVoice

# A voice is F x 64 float32 (100 KB for 10 s of the default voice): 1,000 of them is 100 MB
# of disk per bundle; past that the least recently registered are dropped.
MAX_VOICES = 1000
CACHED_VOICES = 64  # per process: a voice in use is read from disk once


def bundle_key(bundle: str | Path) -> str:
    return hashlib.sha256((Path(bundle) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]


class VoiceStore:
    def __init__(self, root: str | Path, bundle: str | Path) -> None:
        self.key = bundle_key(bundle)
        self.folder = Path(root) / self.key
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def voice_id(self, latents: np.ndarray) -> int:
        """The id of these latents under this bundle: the same reference gets the same id, on
        every instance and after a restart. 63 bits, so it fits a signed INT64."""
        digest = hashlib.sha256(self.key.encode() + np.ascontiguousarray(latents, np.float32).tobytes())
        return int.from_bytes(digest.digest()[:8], "big") >> 1

    def put(self, latents: np.ndarray) -> int:
        voice_id = self.voice_id(latents)
        path = self._path(voice_id)
        if not path.exists():
            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to a name
                    np.save(fh, np.ascontiguousarray(latents, np.float32), allow_pickle=False)

            atomic_write(path, write)
            self._prune()
        else:
            path.touch()  # registered again: the most recent, the last to be dropped
        return voice_id

    def get(self, voice_id: int) -> np.ndarray:
        if voice_id in self._cache:
            self._cache.move_to_end(voice_id)
            return self._cache[voice_id]
        path = self._path(voice_id) if voice_id >= 0 else None
        try:
            latents = np.load(path, allow_pickle=False) if path else None
        except (FileNotFoundError, ValueError, OSError):
            latents = None
        if latents is None:
            raise UnknownVoice(f"unknown voice_id {voice_id}: register the voice first (model register_voice)")
        self._cache[voice_id] = latents
        if len(self._cache) > CACHED_VOICES:
            self._cache.popitem(last=False)
        return latents

    def _path(self, voice_id: int) -> Path:
        return self.folder / f"{voice_id:016x}.npy"

    def _prune(self) -> None:
        files = sorted(self.folder.glob("*.npy"), key=_mtime)
        for old in files[: max(0, len(files) - MAX_VOICES)]:
            old.unlink(missing_ok=True)  # another instance may be pruning too


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by another instance meanwhile
        return 0.0
