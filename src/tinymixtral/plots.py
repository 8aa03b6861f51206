"""PNG plots of a run: loss and learning rate over steps, and the layer x expert load heatmap.

matplotlib is imported lazily and drawn with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

from .run_state import read_metrics


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and expert_load.png into run_dir from its metrics.jsonl; returns the files."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    written = [plot_loss(rows, run_dir / "loss.png")]
    loads = [r for r in rows if "expert_load" in r]
    if loads:
        written.append(plot_expert_load(loads[-1]["expert_load"], run_dir / "expert_load.png",
                                        title=f"expert load at step {loads[-1]['step']}"))
    return written


def plot_loss(rows: list[dict], out: Path) -> Path:
    plt = pyplot()
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", lw=1.5)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, plt, out)


def plot_expert_load(load: list[list[float]], out: Path, title: str = "expert load") -> Path:
    """Heatmap of the fraction of assignments per (layer, expert); 1/E everywhere is perfect balance."""
    plt = pyplot()
    n_layers, n_experts = len(load), len(load[0])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * n_experts), 1.5 + 0.45 * n_layers))
    im = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0)
    for i in range(n_layers):
        for e in range(n_experts):
            ax.text(e, i, f"{load[i][e]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    ax.set_title(f"{title} (balanced = {1 / n_experts:.2f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_png(fig, plt, out)


def save_png(fig, plt, out: Path) -> Path:
    """Save and close a figure, under a temporary name first."""
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
