"""Registered voices: the VAE latents of a reference and its transcript, kept on disk by id.

Each Triton model instance is its own process (the python backend runs one stub per
instance), so `register_voice` and every instance of `ditar` share voices through a folder:
written atomically by one, read by the others. Voices are kept per bundle (a folder named by
the digest of its manifest), so an id never resolves to latents of another model.

A voice is one file, `<id>.npz`: its latents and its transcript ("" for a model that does not
read one). Voices kept before transcripts were (`<id>.npy`, latents alone) still load, with no
transcript; their ids are unchanged, since a voice without a transcript is named as before.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.manifest import MANIFEST_FILE
from ditarkit.serve.protocol import UnknownVoice

# A voice is F x 64 float32 (100 KB for 10 s of the default voice): 1,000 of them is 100 MB
# of disk per bundle; past that the least recently registered are dropped.
MAX_VOICES = 1000
CACHED_VOICES = 64  # per process: a voice in use is read from disk once
SUFFIX, OLD_SUFFIX = ".npz", ".npy"  # latents + transcript; latents alone (before transcripts were kept)
# Hashed between the latents and a transcript, so no latents followed by no transcript can
# read as other latents followed by one.
TRANSCRIPT_SEPARATOR = b"\0reference_text\0"


@dataclass(frozen=True)
class StoredVoice:
    latents: np.ndarray  # (F, C) float32
    text: str = ""  # the reference's transcript


def bundle_key(bundle: str | Path) -> str:
    return hashlib.sha256((Path(bundle) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]


class VoiceStore:
    def __init__(self, root: str | Path, bundle: str | Path) -> None:
        self.key = bundle_key(bundle)
        self.folder = Path(root) / self.key
        self._cache: OrderedDict[int, StoredVoice] = OrderedDict()

    def voice_id(self, latents: np.ndarray, text: str = "") -> int:
        """The id of these latents and this transcript under this bundle: the same reference
        gets the same id, on every instance and after a restart, and the same audio with
        another transcript another id. 63 bits, so it fits a signed INT64."""
        digest = hashlib.sha256(self.key.encode() + np.ascontiguousarray(latents, np.float32).tobytes())
        if text:  # none: the id voices had before transcripts were kept
            digest.update(TRANSCRIPT_SEPARATOR + text.encode("utf-8"))
        return int.from_bytes(digest.digest()[:8], "big") >> 1

    def put(self, latents: np.ndarray, text: str = "") -> int:
        voice_id = self.voice_id(latents, text)
        existing = self._existing(voice_id)
        if existing is None:
            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
                    np.savez(fh, latents=np.ascontiguousarray(latents, np.float32), text=np.array(text, np.str_))

            atomic_write(self._path(voice_id), write)
            self._prune()
        else:
            existing.touch()  # registered again: the most recent, the last to be dropped
        return voice_id

    def get(self, voice_id: int) -> StoredVoice:
        if voice_id in self._cache:
            self._cache.move_to_end(voice_id)
            return self._cache[voice_id]
        path = self._existing(voice_id) if voice_id >= 0 else None
        voice = _load(path) if path else None
        if voice is None:
            raise UnknownVoice(f"unknown voice_id {voice_id}: register the voice first (model register_voice)")
        self._cache[voice_id] = voice
        if len(self._cache) > CACHED_VOICES:
            self._cache.popitem(last=False)
        return voice

    def _path(self, voice_id: int, suffix: str = SUFFIX) -> Path:
        return self.folder / f"{voice_id:016x}{suffix}"

    def _existing(self, voice_id: int) -> Path | None:
        for suffix in (SUFFIX, OLD_SUFFIX):
            path = self._path(voice_id, suffix)
            if path.exists():
                return path
        return None

    def _prune(self) -> None:
        files = sorted([*self.folder.glob(f"*{SUFFIX}"), *self.folder.glob(f"*{OLD_SUFFIX}")], key=_mtime)
        for old in files[: max(0, len(files) - MAX_VOICES)]:
            old.unlink(missing_ok=True)  # another instance may be pruning too


def _load(path: Path) -> StoredVoice | None:
    """A voice file, or None where it is gone (pruned meanwhile) or unreadable."""
    try:
        if path.suffix == OLD_SUFFIX:
            return StoredVoice(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as data:
            return StoredVoice(data["latents"], str(data["text"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # FileNotFoundError is an OSError
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by another instance meanwhile
        return 0.0
