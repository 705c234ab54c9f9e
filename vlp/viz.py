"""Plots of a run: training loss and eval metrics against steps, as one PNG."""

from __future__ import annotations

from pathlib import Path


def plot_run(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlp.train.logging import read_metrics

    records = read_metrics(metrics_jsonl)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax1.set(xlabel="step", ylabel="training loss", title="contrastive loss")
    ax1.grid(alpha=0.3)
    for key, label in [
        ("eval/zeroshot_classification/acc1", "zero-shot acc@1"),
        ("eval/zeroshot_retrieval/text_retrieval_recall@1", "image->text R@1"),
        ("eval/zeroshot_retrieval/image_retrieval_recall@1", "text->image R@1"),
        ("eval/compositional/acc", "compositional acc"),
        ("eval/counting/acc", "counting acc"),
        ("eval/linear_probe/acc1", "linear probe acc@1"),
    ]:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
    for key, label in [  # validation during training (train.val_every), dashed
        ("val/text_retrieval_recall@1", "val image->text R@1"),
        ("val/image_retrieval_recall@10", "val text->image R@10"),
        ("val/score", "val score (mean recall)"),
    ]:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax2.plot(*zip(*pts), linestyle="--", label=label)
    scores = [(r["val/score"], -r["step"]) for r in records if "val/score" in r]
    if scores:  # the run ends with these weights: the final evaluation is of them
        ax2.axvline(-max(scores)[1], color="grey", linestyle=":", label="best validation (weights kept)")
    ax2.set(xlabel="step", ylabel="held-out metric", title="validation and evaluation", ylim=(0, 1))
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
