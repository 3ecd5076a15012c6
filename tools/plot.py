"""Export TensorBoard scalars of one or more runs to a PNG of learning curves.

    python -m tools.plot runs/sft_local runs/grpo_after_sft --out docs/learning_curves.png \
        --tags sft/text_loss sft/token_accuracy reward/total/mean reward/format/mean

Each tag gets a panel; every run that logged it is a line (raw, and a moving average when noisy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rl.monitor import read_scalars

DEFAULT_TAGS = ("sft/text_loss", "sft/token_accuracy", "reward/total/mean", "reward/format/mean",
                "reward/degradation/mean", "reward/understanding/mean", "reward/generation/mean")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    head = [values[: i + 1].mean() for i in range(window - 1)]
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_runs(runs: list[Path], tags: list[str], out: Path, window: int = 5) -> list[str]:
    """Write the PNG; returns the tags that were found in at least one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {run: read_scalars(run / "tensorboard" if (run / "tensorboard").is_dir() else run) for run in runs}
    found = [t for t in tags if any(t in d for d in data.values())]
    if not found:
        raise SystemExit(f"none of the tags {tags} is in {', '.join(map(str, runs))}")
    cols = min(3, len(found))
    rows = (len(found) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, found):
        for i, (run, d) in enumerate(data.items()):
            if tag not in d:
                continue
            steps, values = map(np.asarray, zip(*d[tag]))
            color = f"C{i % 10}"  # a run keeps its colour in every panel
            ax.plot(steps, values, alpha=0.35, linewidth=1, color=color)
            ax.plot(steps, moving_average(values, window), color=color, label=run.name)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>) or TensorBoard dirs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS))
    parser.add_argument("--window", type=int, default=5, help="moving-average window")
    args = parser.parse_args(argv)
    found = plot_runs(args.runs, args.tags, args.out, args.window)
    print(f"wrote {args.out} ({len(found)} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
