"""The training recipe end to end on a made-up corpus: VAE, DiTAR, resume, ship."""

from __future__ import annotations

import json

import soundfile as sf
from conftest import speech_like

from ditarkit.reference.checkpoint import load_checkpoint
from ditarkit.training.train import STATE_FILE, main

TEXTS = ["hello there", "a quick test of the recipe", "one more line", "and the last one"]


def _corpus(root):
    lines = []
    for i, text in enumerate(TEXTS):
        voice = f"v{i % 2}"
        path = root / "wavs" / voice / f"u{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, speech_like(1.5 + 0.5 * i, seed=i), 24_000)
        lines.append(json.dumps({"id": f"u{i}", "voice": voice, "text": text, "path": str(path.relative_to(root)),
                                 "seconds": 1.5 + 0.5 * i}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_recipe_trains_both_stages_resumes_and_ships(tmp_path):
    corpus, run = _corpus(tmp_path / "corpus"), tmp_path / "run"
    common = ["--corpus", str(corpus), "--run", str(run), "--preset", "tiny", "--batch", "2", "--threads", "1"]
    main(["vae", *common, "--steps", "2"])
    vae = load_checkpoint(run / "vae")
    assert float(vae.vae.latent_std.min()) > 0 and float(vae.vae.latent_std.std()) > 0  # statistics were set
    main(["ditar", *common, "--steps", "2", "--max-target-seconds", "3"])
    main(["ditar", *common, "--steps", "3", "--max-target-seconds", "3"])  # resumes at step 2
    import torch

    assert torch.load(run / "ditar" / STATE_FILE, weights_only=True)["step"] == 3
    trained = load_checkpoint(run / "ditar")
    assert torch.equal(trained.vae.latent_mean, vae.vae.latent_mean)  # the VAE stayed frozen
    main(["ship", "--run", str(run), "--out", str(tmp_path / "shipped")])
    shipped = load_checkpoint(tmp_path / "shipped")
    assert shipped.config == trained.config
    # On a fresh machine, training goes on from the shipped checkpoint.
    fresh = ["--corpus", str(corpus), "--run", str(tmp_path / "fresh"), "--preset", "tiny", "--batch", "2"]
    main(["ditar", *fresh, "--steps", "1", "--max-target-seconds", "3", "--init-from", str(tmp_path / "shipped")])
    assert torch.load(tmp_path / "fresh" / "ditar" / STATE_FILE, weights_only=True)["step"] == 1
