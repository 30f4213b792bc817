"""Recording real activations: the inputs every graph receives while the runtime speaks.

Calibration data must be what a quantized graph will see in service, so it is recorded by
running the fp32 bundle through the ordinary runtime (the same sampler, guidance,
temperature and streaming decoder) and capturing each graph's feeds at `GraphRunner.run`.
A seeded reservoir keeps at most `per_graph` feeds of each graph, drawn uniformly from the
whole run, so memory stays bounded however much text is spoken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.manifest import LM, LM_PAST_KEYS, LM_PAST_VALUES, LM_POSITION, LOCDIT_SAMPLER, GraphSpec, Manifest
from ditarkit.runtime.synthesizer import Synthesizer, Voice

Feeds = dict[str, np.ndarray]
Log = Callable[[str], None]


class CalibrationError(ValueError):
    """Calibration cannot run on these inputs (a bundle that is not fp32, unusable text...)."""


def require_fp32(manifest: Manifest, bundle: str | Path) -> None:
    if manifest.precision != "fp32":
        raise CalibrationError(f"{bundle} is a {manifest.precision} bundle: calibrate from an fp32 bundle")


def transcripts(config: ModelContract, references: Sequence[object], texts: Sequence[str] | None) -> list[str]:
    """One transcript per reference ("" each where none are given). A model whose prompt
    reads the reference's transcript (VoxCPM v1 continues from its reference) needs one for
    every reference, in the same order."""
    texts = [t.strip() for t in texts] if texts else []
    if texts and len(texts) != len(references):
        raise CalibrationError(f"{len(texts)} --ref-text for {len(references)} --ref: give one transcript per "
                               "reference, in the same order")
    if config.prompt.needs_reference_text and (not texts or not all(texts)):
        raise CalibrationError("this model continues from its reference: give each --ref its transcript "
                               "with --ref-text, in the same order")
    return texts or [""] * len(references)


def reference_voices(synth: Synthesizer, references: Sequence[str | Path],
                     texts: Sequence[str] | None = None) -> list[Voice]:
    """The references encoded by `synth`, each with its transcript."""
    return [synth.voice(str(r), text=t) for r, t in zip(references, transcripts(synth.config, references, texts))]


PER_GRAPH = 48  # feeds kept per graph: enough for MinMax ranges, small enough for memory


@dataclass(frozen=True)
class Recording:
    """Recorded feeds per graph name, and what was spoken to get them."""

    feeds: dict[str, list[Feeds]]
    sentences: int
    references: tuple[str, ...]

    def save(self, path: str | Path) -> Path:
        arrays = {f"{graph}/{index}/{name}": value
                  for graph, samples in self.feeds.items()
                  for index, feeds in enumerate(samples)
                  for name, value in feeds.items()}
        arrays["_sentences"] = np.array(self.sentences)
        arrays["_references"] = np.array(self.references)
        return atomic_write(path, lambda tmp: _save_npz(tmp, arrays))

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        with np.load(path) as data:
            feeds: dict[str, dict[int, Feeds]] = {}
            for key in data.files:
                if key.startswith("_"):
                    continue
                graph, index, name = key.split("/")
                feeds.setdefault(graph, {}).setdefault(int(index), {})[name] = data[key]
            return cls({g: [s[i] for i in sorted(s)] for g, s in feeds.items()},
                       int(data["_sentences"]), tuple(str(r) for r in data["_references"]))


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
        np.savez_compressed(fh, **arrays)


class RecordingRunner(OrtRunner):
    """An fp32 ONNX Runtime runner that keeps a uniform sample of every graph's feeds. Each
    patch is solved step by step (so the per-step `locdit` graph is recorded), and the inputs
    the fused `locdit_sampler` would have had are recorded beside them."""

    fused_sampler = False

    def __init__(self, bundle: str | Path, per_graph: int = PER_GRAPH, seed: int = 0,
                 threads: int | None = None) -> None:
        super().__init__(bundle, threads=threads)
        self.per_graph = per_graph
        self.rng = np.random.default_rng(seed)
        self.kept: dict[str, list[Feeds]] = {}
        self.seen: dict[str, int] = {}

    def decodes_in_background(self) -> bool:
        return False  # one thread: the seeded reservoir sees the feeds in a fixed order

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._offer(name, feeds)
        return super().run(name, feeds)

    def draw_patch(self, cond: np.ndarray, history: np.ndarray, noise: np.ndarray, nfe: int, cfg_scale: float,
                   temperature: float) -> np.ndarray:
        if nfe == self.config.sampler.nfe:  # the NFE the fused graph is unrolled at
            self._offer(LOCDIT_SAMPLER, self.sampler_feeds(cond, history, noise, nfe, cfg_scale, temperature))
        return super().draw_patch(cond, history, noise, nfe, cfg_scale, temperature)

    def _offer(self, name: str, feeds: Feeds) -> None:
        """Reservoir sampling (Algorithm R): after n offers each is kept with chance k/n."""
        seen = self.seen[name] = self.seen.get(name, 0) + 1
        kept = self.kept.setdefault(name, [])
        if len(kept) < self.per_graph:
            kept.append(_compact(self.specs[name], feeds))
        else:
            slot = int(self.rng.integers(seen))
            if slot < self.per_graph:
                kept[slot] = _compact(self.specs[name], feeds)


def _compact(spec: GraphSpec, feeds: Feeds) -> Feeds:
    """A copy small enough to keep: the LM's cache is cut to its filled slots (at least one,
    the smallest capacity the graph takes). Slots past `position` are masked out, so the
    graph computes exactly the same outputs from the cut cache."""
    copy = {name: np.array(value) for name, value in feeds.items()}
    if spec.name == LM:
        filled = max(1, int(feeds[LM_POSITION][0]))
        for name in (LM_PAST_KEYS, LM_PAST_VALUES):
            copy[name] = np.ascontiguousarray(copy[name][:, :, :, :filled])
    return copy


def record(
    bundle: str | Path,
    texts: Iterable[str],
    references: Iterable[str | Path],
    per_graph: int = PER_GRAPH,
    seed: int = 0,
    max_seconds: float | None = None,
    log: Log = lambda _msg: None,
    reference_texts: Sequence[str] | None = None,
) -> Recording:
    """Speak each text with the references in turn through the fp32 bundle; keep the feeds.
    `reference_texts`: what each reference says, for models that read it (`transcripts`)."""
    runner = RecordingRunner(bundle, per_graph, seed)
    require_fp32(runner.manifest, bundle)
    synth = Synthesizer.from_runner(runner)
    refs = [str(r) for r in references]
    voices = reference_voices(synth, refs, reference_texts)
    texts = list(texts)
    for index, text in enumerate(texts):
        synth.synthesize(text, voices[index % len(voices)], synth.options(seed=seed + index, max_seconds=max_seconds))
        log(f"recorded {index + 1}/{len(texts)}: {text[:50]}")
    return Recording(runner.kept, len(texts), tuple(refs))
