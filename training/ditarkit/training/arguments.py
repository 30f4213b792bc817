"""The training command's arguments: the parser, and the one-line refusals of settings that
would fail, or silently do nothing, later in a run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ditarkit.runtime.config import ConfigError, preset
from ditarkit.training.stage import Schedule


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "ditar", "ship"])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget of this invocation")
    parser.add_argument("--steps", type=int, help="stop at this total step count")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--crop-seconds", type=float, default=1.0, help="VAE training crops")
    parser.add_argument("--max-target-seconds", type=float, default=8.0)
    parser.add_argument("--diffusion-samples", type=int, default=2, help="noise levels drawn per patch")
    parser.add_argument("--aligned-heads", default="1:0,1:1,2:0,2:1",
                        help="LAYER:HEAD,... of the LM supervised toward the spoken characters ('' for none)")
    parser.add_argument("--alignment-weight", type=float, default=0.3, help="attention alignment loss weight")
    parser.add_argument("--advance-weight", type=float, default=0.5,
                        help="text cursor's advance-head loss weight (presets with a cursor)")
    parser.add_argument("--history-noise", type=float, default=0.3,
                        help="probability that a patch's LocDiT history is mixed with noise in training")
    parser.add_argument("--lm-input-noise", type=float, default=0.0,
                        help="probability that an utterance's patches are mixed with noise where the LM reads "
                        "them in training (against exposure bias)")
    parser.add_argument("--drawn-inputs", type=float, default=0.0,
                        help="probability that an utterance's patches are LocDiT's own draws where the LM reads "
                        "them and in LocDiT's history, in training (scheduled sampling; the draws cost time)")
    parser.add_argument("--engine-shares", type=parse_engine_shares, default={}, metavar="ENGINE=SHARE,...",
                        help="DiTAR stage: the share of the drawn utterances each named engine gets (e.g. "
                        "kokoro=0.35: its varied voices drawn more than their hours would; default: uniform)")
    parser.add_argument("--drawn-nfe", type=int, default=4, help="solver steps of those draws")
    parser.add_argument("--warmup", type=int, default=500, help="steps of linear learning-rate warm-up")
    parser.add_argument("--lr-decay-steps", type=int, default=0,
                        help="DiTAR stage: after the warm-up, a cosine decay of the learning rate over this many "
                        "steps, to --lr-final of it, held there after (0: constant); counted from step 0 of the "
                        "stage, not from a resume: pass the same values to resume")
    parser.add_argument("--lr-final", type=float, default=0.1, help="the decayed learning rate, as a share of --lr")
    parser.add_argument("--ema", type=float, default=0.999,
                        help="DiTAR stage: decay of the weights' moving average that is checkpointed (0: none)")
    parser.add_argument("--metrics-every", type=int, default=200, help="alignment metrics on the probe (0: never)")
    parser.add_argument("--wer-every", type=int, default=0,
                        help="free-running WER through an exported bundle every N steps (a multiple of "
                        "--metrics-every; 0: never)")
    parser.add_argument("--forced-wer-every", type=int, default=0,
                        help="teacher-forced and free-running WER on the probe's sentences in their own voices "
                        "every N steps (a multiple of --metrics-every; 0: never)")
    parser.add_argument("--wer-sentences", type=int, default=6,
                        help="sentences of either WER: held-out ones in unseen voices for the free-running WER, "
                        "the probe's at rate 1.0 for the teacher-forced one")
    parser.add_argument("--isolated-history", choices=["on", "off"],
                        help="a new model's LocDiT history attention (default: the preset's)")
    parser.add_argument("--locdit-layers", type=int,
                        help="a new model's LocDiT depth (default: the preset's); --init-from a shallower LocDiT "
                        "takes its blocks, and the extra ones start as identities")
    parser.add_argument("--advance-to-locdit", action="store_true",
                        help="a new model's LocDiT is told the advance of the patch it draws (cursor presets; "
                        "the embedding starts at zero, so --init-from a model without it starts as that model)")
    parser.add_argument("--frontend", choices=["chars", "lexicon"],
                        help="a new model's text frontend: characters, or words as phonemes from the packaged "
                        "lexicon (CMUdict; letters for words it lacks); default: --init-from's, else characters. "
                        "From --init-from of the other kind, the rows of the symbols both read are carried over")
    parser.add_argument("--vae-from", type=Path, help="a checkpoint whose VAE a new DiTAR stage takes (e.g. the "
                        "shipped default voice), instead of the VAE stage's")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="DiTAR stage matmuls: auto = bf16 autocast where the CPU or GPU has native bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each worker")
    parser.add_argument("--workers", type=int, default=1,
                        help="DiTAR stage: data-parallel processes on this machine, each with --batch/N utterances "
                        "and its own random streams, averaging gradients every step (one per core: a step of the "
                        "small presets is bound by per-operation overhead, so one process leaves a second core idle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="ship: checkpoint folder (default: the embedded default voice)")
    parser.add_argument("--init-from", type=Path, help="a checkpoint to start a stage from when it has none of its own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_engine_shares(spec: str) -> dict[str, float]:
    """'kokoro=0.35' -> {'kokoro': 0.35}: the share of the draws each named engine gets."""
    shares = {}
    for item in filter(None, spec.split(",")):
        name, _, share = item.partition("=")
        engine = name.strip()
        try:
            shares[engine] = float(share)
        except ValueError:
            raise SystemExit(f"error: --engine-shares item {item!r} is not ENGINE=SHARE") from None
        if not engine or not 0.0 < shares[engine] <= 1.0:
            raise SystemExit(f"error: --engine-shares item {item!r} is not ENGINE=SHARE with a share in (0, 1]")
    if sum(shares.values()) > 1.0 + 1e-9:  # slack for decimal shares that sum to 1 in floating point
        raise SystemExit(f"error: --engine-shares {spec} add up to more than 1")
    return shares


def check_arguments(args: argparse.Namespace) -> None:
    """One-line refusals of settings that would fail, or silently do nothing, later."""
    if not 0.0 <= args.ema < 1.0:
        raise SystemExit(f"error: --ema {args.ema} is not a decay in [0, 1) (0: no moving average)")
    if args.drawn_nfe < 1:
        raise SystemExit(f"error: --drawn-nfe {args.drawn_nfe} is not a step count (1 or more)")
    for name in ("history_noise", "lm_input_noise", "drawn_inputs"):
        rate = getattr(args, name)
        if not 0.0 <= rate <= 1.0:
            raise SystemExit(f"error: --{name.replace('_', '-')} {rate} is not a probability in [0, 1]")
    for name in ("wer_every", "forced_wer_every"):
        every = getattr(args, name)
        if every and (not args.metrics_every or every % args.metrics_every):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} {every} is not a multiple of --metrics-every {args.metrics_every}")
    try:
        Schedule(args.lr, args.warmup, args.lr_decay_steps, args.lr_final)
    except ValueError:
        raise SystemExit(f"error: --warmup {args.warmup}, --lr-decay-steps {args.lr_decay_steps} and --lr-final "
                         f"{args.lr_final} are not a schedule "
                         "(warm-up 1 or more, decay 0 or more, final in [0, 1])") from None
    try:
        config = preset(args.preset)
    except ConfigError as e:
        raise SystemExit(f"error: --preset: {e}") from None
    if args.advance_to_locdit and config.cursor is None:
        raise SystemExit(f"error: --advance-to-locdit needs a preset with a text cursor; {args.preset} has none")
    if args.locdit_layers is not None and args.locdit_layers < 1:
        raise SystemExit(f"error: --locdit-layers {args.locdit_layers} is not a layer count (1 or more)")
    if args.workers < 1 or args.batch % args.workers:
        raise SystemExit(f"error: --workers {args.workers} does not divide --batch {args.batch} into equal shares")
    if args.workers > 1 and args.stage != "ditar":
        raise SystemExit(f"error: --workers is for the DiTAR stage; the {args.stage} stage runs in one process")
    if args.workers > 1 and torch.device(args.device).type != "cpu":
        raise SystemExit(f"error: --workers is for a CPU's cores; on {args.device} train in one process")
