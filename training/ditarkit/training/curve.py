"""The training curve: a PNG beside the log, redrawn whenever the log grows."""

from __future__ import annotations

import json
from pathlib import Path

from ditarkit.runtime.fileio import atomic_write

PANELS = (
    ("losses", ("diffusion", "stop", "alignment", "advance", "probe_diffusion", "probe_diffusion_raw")),
    ("LM is used by LocDiT; own draws as inputs; told advance (loss gap, %)",
     ("gap_swapped_text_pct", "gap_zeroed_lm_pct", "gap_drawn_inputs_pct", "gap_wrong_advance_pct",
      "gap_own_advance_pct")),
    ("aligned heads and free cursor: characters off (probe)", (
        "aligned_error_r0.7", "aligned_error_r1", "aligned_error_r1.5", "best_head_error_r0.7", "best_head_error_r1",
        "best_head_error_r1.5", "cursor_error_r0.7", "cursor_error_r1", "cursor_error_r1.5")),
    ("WER (%): unseen voices free-running; probe free-running, teacher-forced, VAE round trip;\n"
     "words heard right (%), unseen voices", ("wer_pct", "free_probe_wer_pct", "forced_wer_pct", "round_trip_wer_pct",
                                              "heard_pct")),
)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curve(log_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.6 * len(PANELS)), sharex=True)
    for ax, (name, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[-1].set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
