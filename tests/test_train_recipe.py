"""The training recipe end to end on a made-up aligned corpus: VAE, DiTAR with metrics and a
curve, exact resume, ship, and going on from a shipped checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import speech_like

from ditarkit.reference.checkpoint import load_checkpoint
from ditarkit.runtime.config import TextConfig
from ditarkit.runtime.text import TextFrontend
from ditarkit.training.train import CURVE_FILE, LOG_FILE, STATE_FILE, main

TEXTS = ["hello there", "a quick test of the recipe", "one more line", "and the last one"]
HEADS = "0:0,1:1"  # the tiny preset's LM has 2 layers of 4 heads


def _row(root, folder: str, uid: str, voice: str, text: str, seconds: float, seed: int) -> str:
    path = root / folder / voice / f"{uid}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speech_like(seconds, seed=seed), 24_000)
    readable = TextFrontend(TextConfig()).readable(text)
    edges = np.linspace(0, int(seconds * 24_000), len(readable) + 1).astype(int)  # evenly spoken
    chars = np.stack([edges[:-1], edges[1:]], axis=1).tolist()
    return json.dumps({"id": uid, "voice": voice, "text": text, "path": str(path.relative_to(root)),
                       "seconds": seconds, "rate": 1.0 + 0.25 * (seed % 2), "chars": chars})


def _corpus(root):
    rows = [_row(root, "wavs", f"u{i}", f"v{i % 2}", t, 1.5 + 0.5 * i, i) for i, t in enumerate(TEXTS)]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    probe = [_row(root, "probe", f"p{i}", "v0", t, 1.2 + 0.3 * i, 10 + i) for i, t in enumerate(TEXTS[:2])]
    (root / "probe.jsonl").write_text("\n".join(probe) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    corpus, run = _corpus(root / "corpus"), root / "run"
    common = ["--corpus", str(corpus), "--preset", "tiny", "--batch", "2", "--threads", "1",
              "--max-target-seconds", "3", "--aligned-heads", HEADS, "--metrics-every", "2"]
    main(["vae", *common[:8], "--run", str(run), "--steps", "2"])
    return root, corpus, run, common


def test_vae_stage_sets_latent_statistics(trained):
    _, _, run, _ = trained
    vae = load_checkpoint(run / "vae")
    assert float(vae.vae.latent_std.min()) > 0 and float(vae.vae.latent_std.std()) > 0


def test_ditar_resumes_exactly_where_an_uninterrupted_run_would_be(trained):
    root, _, run, common = trained
    straight, stopped = root / "straight", root / "stopped"
    for target in (straight, stopped):
        (target / "vae").mkdir(parents=True)
        for f in (run / "vae").iterdir():
            (target / "vae" / f.name).write_bytes(f.read_bytes())
    main(["ditar", *common, "--run", str(straight), "--steps", "4"])
    main(["ditar", *common, "--run", str(stopped), "--steps", "2"])
    main(["ditar", *common, "--run", str(stopped), "--steps", "4"])  # a new process would do the same
    assert torch.load(stopped / "ditar" / STATE_FILE, weights_only=True)["step"] == 4
    a, b = load_checkpoint(straight / "ditar").state_dict(), load_checkpoint(stopped / "ditar").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same batches, same noise: bit for bit
    assert torch.equal(a["vae.latent_mean"], load_checkpoint(run / "vae").state_dict()["vae.latent_mean"])


def test_ditar_logs_alignment_metrics_and_draws_the_curve(trained):
    root, _, _, common = trained
    run = root / "straight" / "ditar"
    rows = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    metrics = [r for r in rows if "gap_swapped_text_pct" in r]
    assert [r["step"] for r in metrics] == [0, 2, 4]
    assert all(0.0 <= r["text_mass_mean"] <= 1.0 and r["aligned_error_r1"] >= 0 for r in metrics)
    assert {"aligned_error_r1.25", "best_head"} <= set(metrics[-1])
    assert (run / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ship_then_go_on_from_the_shipped_checkpoint(trained):
    root, corpus, _, common = trained
    main(["ship", "--run", str(root / "straight"), "--out", str(root / "shipped")])
    shipped = load_checkpoint(root / "shipped")
    assert shipped.config == load_checkpoint(root / "straight" / "ditar").config
    fresh = root / "fresh"
    main(["ditar", *common, "--run", str(fresh), "--steps", "1", "--init-from", str(root / "shipped")])
    assert torch.load(fresh / "ditar" / STATE_FILE, weights_only=True)["step"] == 1


def test_bad_aligned_heads_are_refused_with_one_line(trained):
    root, _, run, common = trained
    args = [a if a != HEADS else "5:0" for a in common]
    with pytest.raises(SystemExit, match="outside the LM's 2 layers x 4 heads"):
        main(["ditar", *args, "--run", str(root / "bad"), "--steps", "1", "--vae-from", str(run / "vae")])
