"""Plots of evaluation results (PNG beside the JSON)."""

from __future__ import annotations

from pathlib import Path


def plot_confusion(confusion, labels, out_png: str | Path) -> Path:
    """A heat map of a confusion matrix (rows: true, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted count",
        ylabel="true count",
        title="counting",
    )
    for i, row in enumerate(confusion.tolist() if hasattr(confusion, "tolist") else confusion):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
