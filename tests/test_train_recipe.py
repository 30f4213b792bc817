"""The training recipe end to end on a made-up aligned corpus: VAE, DiTAR with metrics and a
curve, exact resume, ship, and going on from a shipped checkpoint."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import speech_like

from ditarkit.reference.checkpoint import load_checkpoint
from ditarkit.runtime.config import TextConfig
from ditarkit.runtime.text import TextFrontend
from ditarkit.training import train
from ditarkit.training.data import DiTARBatches, Utterance, draw_weights, encode_corpus, read_manifest
from ditarkit.training.forced import forced_audio, forced_sentences, free_audio, probe_wer
from ditarkit.training.metrics import build_probe
from ditarkit.training.stage import CURVE_FILE, LOG_FILE, STATE_FILE, Schedule
from ditarkit.training.train import main

TEXTS = ["hello there", "a quick test of the recipe", "one more line", "and the last one"]
HEADS = "0:0,1:1"  # the tiny preset's LM has 2 layers of 4 heads
SIGNAL_WAIT_SECONDS = 180  # a loaded CI machine starts torch and steps the tiny preset well within this


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


class SilentTranscriber:
    """Whisper's stand-in: hears nothing, so every WER the log gets is 100%."""

    def __call__(self, audio: np.ndarray, rate: int) -> str:
        return ""


@pytest.fixture(scope="module", autouse=True)
def no_whisper():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "Transcriber", SilentTranscriber)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    corpus, run = _corpus(root / "corpus"), root / "run"
    common = ["--corpus", str(corpus), "--preset", "tiny", "--batch", "2", "--threads", "1",
              "--max-target-seconds", "3", "--aligned-heads", HEADS, "--metrics-every", "2", "--forced-wer-every", "4",
              "--lm-input-noise", "0.5", "--drawn-inputs", "0.5", "--drawn-nfe", "2"]
    main(["vae", *common[:8], "--run", str(run), "--steps", "2"])
    return root, corpus, run, common


def _with_vae(run, target):
    """A new run folder holding the fixture's VAE stage."""
    (target / "vae").mkdir(parents=True)
    for f in (run / "vae").iterdir():
        (target / "vae" / f.name).write_bytes(f.read_bytes())
    return target


def test_vae_stage_sets_latent_statistics(trained):
    _, _, run, _ = trained
    vae = load_checkpoint(run / "vae")
    assert float(vae.vae.latent_std.min()) > 0 and float(vae.vae.latent_std.std()) > 0


def test_ditar_resumes_exactly_where_an_uninterrupted_run_would_be(trained):
    root, _, run, common = trained
    straight, stopped = _with_vae(run, root / "straight"), _with_vae(run, root / "stopped")
    main(["ditar", *common, "--run", str(straight), "--steps", "4"])
    main(["ditar", *common, "--run", str(stopped), "--steps", "2"])
    main(["ditar", *common, "--run", str(stopped), "--steps", "4"])  # a new process would do the same
    assert torch.load(stopped / "ditar" / STATE_FILE, weights_only=True)["step"] == 4
    a, b = load_checkpoint(straight / "ditar").state_dict(), load_checkpoint(stopped / "ditar").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same batches, same noise: bit for bit
    raw_a, raw_b = (torch.load(t / "ditar" / STATE_FILE, weights_only=True)["model"] for t in (straight, stopped))
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)  # the weights the average follows, too
    assert torch.equal(a["vae.latent_mean"], load_checkpoint(run / "vae").state_dict()["vae.latent_mean"])


def test_ditar_logs_alignment_metrics_and_draws_the_curve(trained):
    root, _, _, common = trained
    run = root / "straight" / "ditar"
    rows = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    metrics = [r for r in rows if "gap_swapped_text_pct" in r]
    assert [r["step"] for r in metrics] == [0, 2, 4]
    assert all(0.0 <= r["text_mass_mean"] <= 1.0 and r["aligned_error_r1"] >= 0 for r in metrics)
    assert {"aligned_error_r1.25", "best_head"} <= set(metrics[-1])
    # LocDiT starts with a zero output layer: its own draws cannot move its loss at step 0; later they do
    assert metrics[0]["gap_drawn_inputs_pct"] == 0.0 and metrics[-1]["gap_drawn_inputs_pct"] != 0.0
    assert all(0 <= r["advance_acc_drawn"] <= 1 for r in metrics)
    forced = [r for r in metrics if "forced_wer_pct" in r]
    assert [r["step"] for r in forced] == [0, 4]  # every --forced-wer-every steps
    scores = ("forced_wer_pct", "free_probe_wer_pct", "round_trip_wer_pct")
    assert all(r[k] == 100.0 for r in forced for k in scores)  # heard nothing
    assert (run / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_checkpoint_holds_the_moving_average_and_the_log_its_gain(trained):
    root, _, _, _ = trained
    run = root / "straight" / "ditar"
    average = load_checkpoint(run).state_dict()
    raw = torch.load(run / STATE_FILE, weights_only=True)["model"]
    trained_names = [k for k in raw if not k.startswith("vae.") and raw[k].is_floating_point()]
    assert any(not torch.equal(average[k], raw[k]) for k in trained_names)
    assert all(torch.equal(average[k], raw[k]) for k in raw if k.startswith("vae."))  # frozen: no drift
    rows = [r for r in map(json.loads, (run / LOG_FILE).read_text().splitlines()) if "gap_swapped_text_pct" in r]
    assert rows[0]["probe_diffusion"] == rows[0]["probe_diffusion_raw"]  # step 0: the average is the weights
    assert all(r["probe_diffusion_raw"] > 0 for r in rows)


def test_probe_audio_is_drawn_teacher_forced_and_free_running_reproducibly_and_scored(trained):
    root, corpus, _, _ = trained
    run = root / "straight"
    model = load_checkpoint(run / "ditar")
    items, probe_items = read_manifest(corpus), read_manifest(corpus, "probe.jsonl")
    latents = encode_corpus(model, items + probe_items, run, "cpu")
    probe = build_probe(probe_items, DiTARBatches(items, latents, model.config, 2, 0, 3.0, (0.5, 1.0)), "cpu")
    rows = forced_sentences(probe, 5)
    assert rows == [0]  # the one probe sentence at the normal rate
    drawn, true = forced_audio(model, probe, rows)
    patch_samples = model.config.patch_size * model.config.audio.hop_length
    assert drawn[0].shape == true[0].shape and drawn[0].shape[0] % patch_samples == 0
    assert np.array_equal(drawn[0], forced_audio(model, probe, rows)[0][0])  # fixed noise
    assert not np.allclose(drawn[0], true[0])  # drawn, not copied
    free = free_audio(model, probe, rows)
    assert len(free) == 1 and len(free[0]) % patch_samples == 0 and np.isfinite(free[0]).all()
    assert np.array_equal(free[0], free_audio(model, probe, rows)[0])  # fixed noise
    true_patches = int(probe.batch.target_patches[0])
    assert len(free[0]) <= 2 * true_patches * patch_samples  # never past FREE_LENGTH_CAP of the true length
    assert probe_wer(model, probe, rows, lambda audio, rate: probe.texts[0]) == {
        "forced_wer_pct": 0.0, "free_probe_wer_pct": 0.0, "round_trip_wer_pct": 0.0}

    def deaf_to_free(audio: np.ndarray, rate: int) -> str:  # free-running audio is reproducible: spot it
        return "" if np.array_equal(audio, free[0]) else probe.texts[0]

    scores = probe_wer(model, probe, rows, deaf_to_free)
    assert scores["free_probe_wer_pct"] == 100.0 and scores["forced_wer_pct"] == 0.0


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


@pytest.mark.parametrize(("flags", "message"), [
    (["--ema", "1.0"], "--ema 1.0 is not a decay in"),
    (["--lm-input-noise", "1.5"], "--lm-input-noise 1.5 is not a probability in"),
    (["--drawn-inputs", "-0.5"], "--drawn-inputs -0.5 is not a probability in"),
    (["--drawn-nfe", "0"], "--drawn-nfe 0 is not a step count"),
    (["--metrics-every", "3", "--forced-wer-every", "4"], "--forced-wer-every 4 is not a multiple of"),
    (["--metrics-every", "0", "--wer-every", "4"], "--wer-every 4 is not a multiple of --metrics-every 0"),
    (["--workers", "3", "--batch", "16"], "--workers 3 does not divide --batch 16 into equal shares"),
    (["--workers", "0"], "--workers 0 does not divide"),
    (["--lr-final", "1.5"], "--lr-final 1.5 are not a schedule"),
    (["--lr-decay-steps", "-1"], "--lr-decay-steps -1 and"),
    (["--engine-shares", "kokoro"], "--engine-shares item 'kokoro' is not ENGINE=SHARE"),
    (["--engine-shares", "kokoro=0"], "is not ENGINE=SHARE with a share in"),
    (["--engine-shares", "kokoro=0.6,flite=0.5"], "add up to more than 1"),
    (["--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["--preset", "paper", "--advance-to-locdit"], "--advance-to-locdit needs a preset with a text cursor"),
])
def test_settings_that_could_not_work_are_refused_with_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["ditar", "--run", str(tmp_path), *flags])


def _voices(*names: str) -> list[Utterance]:
    return [Utterance(f"u{i}", name, "text", Path("x.wav")) for i, name in enumerate(names)]


def test_engine_shares_set_each_engine_s_share_of_the_draws():
    items = _voices("piper_joe", "piper_joe_p+2", "piper_joe_p-4_warm", "kokoro_af_bella", "flite_slt")
    assert draw_weights(items, {}) is None  # uniform
    weights = draw_weights(items, {"kokoro": 0.4})
    assert weights == pytest.approx([0.15, 0.15, 0.15, 0.4, 0.15])  # the rest split by utterance count
    assert sum(weights) == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="no utterance of the corpus is from espeak"):
        draw_weights(items, {"espeak": 0.2})


def _wait_for_step_two(proc: subprocess.Popen, log) -> None:
    """Until the training child has logged step 2; it must still be training then."""
    deadline = time.monotonic() + SIGNAL_WAIT_SECONDS
    while proc.poll() is None and time.monotonic() < deadline and not (
            log.is_file() and any(json.loads(line)["step"] >= 2 for line in log.read_text().splitlines())):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still training when the signal lands


def _interruptible() -> None:
    """The child gets SIGINT as a foreground process would: a suite run in the background
    has it ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_training_after_its_step_with_a_checkpoint(trained, signum):
    root, _, run, common = trained
    target = _with_vae(run, root / f"signalled-{signum}")
    flags = [f for f in common if f not in ("--forced-wer-every", "4")]  # no Whisper in the child
    proc = subprocess.Popen([sys.executable, "-m", "ditarkit.training.train", "ditar", *flags, "--run", str(target),
                             "--minutes", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)
    _wait_for_step_two(proc, target / "ditar" / LOG_FILE)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=SIGNAL_WAIT_SECONDS)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert f"{signal.Signals(signum).name}: stopped after step" in stderr
    saved = torch.load(target / "ditar" / STATE_FILE, weights_only=True)["step"]
    assert saved >= 2 and f"saved at step {saved}" in stderr
    assert load_checkpoint(target / "ditar").config.name == "tiny"



def test_a_lexicon_model_starts_from_a_character_one_with_the_shared_rows_carried(trained, capsys):
    root, _, vae_run, common = trained
    main(["ditar", *common, "--run", str(root / "chars"), "--steps", "1", "--vae-from", str(vae_run / "vae")])
    source = load_checkpoint(root / "chars" / "ditar")
    run = root / "lexicon"
    capsys.readouterr()
    main(["ditar", *common, "--run", str(run), "--steps", "2", "--frontend", "lexicon",
          "--init-from", str(root / "chars" / "ditar")])
    assert "text tables carried over" in capsys.readouterr().err
    model = load_checkpoint(run / "ditar")
    assert model.config.text.frontend == "lexicon" and source.config.text.frontend == "chars"
    assert model.config.text.vocab_size > source.config.text.vocab_size
    rows = [json.loads(line) for line in (run / "ditar" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows if "gap_swapped_text_pct" in r] == [0, 2]  # the probe reads units too
    with pytest.raises(SystemExit, match="reads with the lexicon frontend, not chars"):
        main(["ditar", *common, "--run", str(run), "--steps", "3", "--frontend", "chars"])
    onward = root / "lexicon-onward"  # --init-from a lexicon model, no --frontend: it stays one
    main(["ditar", *common, "--run", str(onward), "--steps", "1", "--init-from", str(run / "ditar")])
    assert load_checkpoint(onward / "ditar").config.text == model.config.text


def test_text_tables_are_carried_by_what_each_id_means():
    from ditarkit.reference.model import DiTAR
    from ditarkit.runtime.config import lexicon_text, preset
    from ditarkit.training.text_tables import carry_text_tables, unit_ids

    torch.manual_seed(0)
    chars = DiTAR(preset("tiny"))
    lexicon = DiTAR(dataclasses.replace(preset("tiny"), text=lexicon_text()))
    tables = carry_text_tables(lexicon, chars)
    old, new = unit_ids(chars.config.text), unit_ids(lexicon.config.text)
    embedding = tables["text_embedding.weight"]
    for unit in ("<special 1>", "a", " ", "?"):
        assert torch.equal(embedding[new[unit]], chars.text_embedding.weight[old[unit]])
    cursor, window = tables["text_cursor.embedding.weight"], chars.config.cursor.window
    v_old, v_new = chars.config.text.vocab_size, lexicon.config.text.vocab_size
    assert cursor.shape[0] == window * v_new
    for offset in range(window):  # each window offset has its own block of rows
        carried = chars.text_cursor.embedding.weight[offset * v_old + old["q"]]
        assert torch.equal(cursor[offset * v_new + new["q"]], carried)
    # the phonemes start at the carried rows' mean norm, not at the init's much smaller one
    carried_norm = chars.text_embedding.weight.norm(dim=-1).mean()
    assert torch.allclose(embedding[new["AA1"]].norm(), carried_norm, rtol=1e-5)
    alien = DiTAR(dataclasses.replace(preset("tiny"), text=lexicon_text(TextConfig(symbols="#"))))
    with pytest.raises(SystemExit, match="share no symbol"):
        carry_text_tables(alien, DiTAR(dataclasses.replace(preset("tiny"), text=TextConfig(symbols="ab"))))


def test_a_lexicon_alignment_shares_a_word_s_span_among_its_phonemes():
    from ditarkit.runtime.config import lexicon_text
    from ditarkit.runtime.text import model_frontend
    from ditarkit.training.data import Utterance

    text = "hello qx"
    chars = np.array([[10 * i, 10 * i + 10] for i in range(len(text))])  # character i spans [10 i, 10 i + 10)
    item = Utterance("u", "v", text, None, chars)
    assert np.array_equal(item.in_units(TextFrontend(TextConfig())).chars, chars)  # characters: as they are
    units = item.in_units(model_frontend(lexicon_text())).chars
    # HH AH0 L OW1 share "hello"'s 50 samples evenly, in order, as its letters did; " ", q, x as they were
    assert units.tolist() == [[0, 12], [12, 25], [25, 38], [38, 50], [50, 60], [60, 70], [70, 80]]


def test_two_workers_resume_exactly_and_part_the_batch(trained):
    root, _, run, common = trained
    straight, stopped = _with_vae(run, root / "pair-straight"), _with_vae(run, root / "pair-stopped")
    pair = [*common, "--workers", "2"]  # --batch 2: one utterance each
    main(["ditar", *pair, "--run", str(straight), "--steps", "4"])
    main(["ditar", *pair, "--run", str(stopped), "--steps", "2"])
    main(["ditar", *pair, "--run", str(stopped), "--steps", "4"])
    state = torch.load(stopped / "ditar" / STATE_FILE, weights_only=True)
    assert state["step"] == 4 and len(state["workers"]) == 1  # the follower's streams travel with the lead's
    assert not torch.equal(state["torch_rng"], state["workers"][0]["torch_rng"])  # each draws its own noise
    a, b = load_checkpoint(straight / "ditar").state_dict(), load_checkpoint(stopped / "ditar").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    single = load_checkpoint(root / "straight" / "ditar").state_dict()  # one process, the whole batch
    assert any(not torch.equal(a[k], single[k]) for k in a if not k.startswith("vae."))
    rows = [json.loads(line) for line in (straight / "ditar" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows if "gap_swapped_text_pct" in r] == [0, 2, 4]  # the lead alone logs
    assert (straight / "ditar" / "worker-1.log").is_file()


def test_the_vae_stage_refuses_workers(tmp_path):
    with pytest.raises(SystemExit, match="--workers is for the DiTAR stage; the vae stage runs in one process"):
        main(["vae", "--run", str(tmp_path), "--workers", "2"])


def test_a_run_that_changes_its_worker_count_goes_on_with_new_streams(trained, capsys):
    root, _, run, common = trained
    target = _with_vae(run, root / "one-then-two")
    main(["ditar", *common, "--run", str(target), "--steps", "2"])
    main(["ditar", *common, "--workers", "2", "--run", str(target), "--steps", "4"])
    assert "holds the random streams of 1 workers, this run has 2" in capsys.readouterr().err
    assert len(torch.load(target / "ditar" / STATE_FILE, weights_only=True)["workers"]) == 1
    main(["ditar", *common, "--run", str(target), "--steps", "5"])  # and back to one
    assert torch.load(target / "ditar" / STATE_FILE, weights_only=True)["step"] == 5


def test_a_stop_signal_to_the_lead_ends_every_worker_after_the_same_step(trained):
    root, _, run, common = trained
    target = _with_vae(run, root / "pair-signalled")
    flags = [f for f in common if f not in ("--forced-wer-every", "4")]
    proc = subprocess.Popen([sys.executable, "-m", "ditarkit.training.train", "ditar", *flags, "--workers", "2",
                             "--run", str(target), "--minutes", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_step_two(proc, target / "ditar" / LOG_FILE)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=SIGNAL_WAIT_SECONDS)
    follower = (target / "ditar" / "worker-1.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:] + "\nworker 1:\n" + follower[-2000:]
    state = torch.load(target / "ditar" / STATE_FILE, weights_only=True)
    assert f"saved at step {state['step']}" in stderr and len(state["workers"]) == 1
    assert "Traceback" not in follower


def test_a_deeper_locdit_grows_from_a_shallower_one_as_the_same_function(trained, capsys):
    root, _, _, common = trained
    source = load_checkpoint(root / "straight" / "ditar").eval()
    deeper = dataclasses.replace(source.config, locdit=dataclasses.replace(source.config.locdit, layers=3))
    model = train.DiTAR(deeper).eval()
    taken = train.take_weights(model, source, "the tiny run")
    grown = "blocks the tiny run does not have start as identities: locdit.transformer.blocks.2"
    assert grown in capsys.readouterr().err
    assert not any(k.startswith("locdit.transformer.blocks.2.") for k in taken)
    g = torch.Generator().manual_seed(0)
    p, c, d = source.config.patch_size, source.config.audio.latent_dim, source.config.lm.dim
    x, t = torch.randn(2, p, c, generator=g), torch.rand(2, generator=g)
    cond, history = torch.randn(2, d, generator=g), torch.randn(2, source.config.history_frames, c, generator=g)
    with torch.no_grad():
        assert torch.equal(model.locdit(x, t, cond, history), source.locdit(x, t, cond, history))
    run = root / "grown"
    main(["ditar", *common, "--run", str(run), "--init-from", str(root / "straight" / "ditar"),
          "--locdit-layers", "3", "--steps", "1", "--metrics-every", "0", "--forced-wer-every", "0"])
    assert load_checkpoint(run / "ditar").config.locdit.layers == 3


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    schedule = Schedule(1e-3, warmup=10, decay_steps=100, final=0.1)
    assert schedule(0) == pytest.approx(1e-4) and schedule(9) == pytest.approx(1e-3)
    assert schedule(59) == pytest.approx(0.55e-3)  # half-way down the cosine: the mean of peak and floor
    assert schedule(109) == pytest.approx(1e-4) and schedule(5000) == pytest.approx(1e-4)
    assert all(schedule(s) >= schedule(s + 1) for s in range(9, 200))
    assert Schedule(1e-3, warmup=10)(5000) == 1e-3  # no decay asked: constant
