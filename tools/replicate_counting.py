"""Counting loss ("Teaching CLIP to Count to Ten"), replicated small: the `debug` CLIP on the shapes
data, with and without counting counterfactuals and the counting loss (lambda = 1), same steps
and seed. Target (issue #7): held-out counting accuracy +15 points, zero-shot at most -2 points, on
the mean over seeds: one seed's zero-shot change has a standard deviation of about 3 points (seed 0
alone: -5.0; five seeds: -1.6 +- 2.6, counting +20.4 +- 3.9; docs/results.md, "Counting loss").

    python tools/replicate_counting.py --seeds 0 1          # about 15 minutes on 2 CPU cores
    python tools/replicate_counting.py --quick --json       # a smoke run, one JSON object

Another lambda against baselines already trained (``--baseline-from``: the variant only)::

    python tools/replicate_counting.py --seeds 0 1 --baseline-from runs/replicate_counting
        --variant-set loss.counting_weight=0.5 --out runs/replicate_counting_lambda05
"""

from replicate_common import replicate

VARIANT = ["data.counterfactuals=true", "loss.counting_weight=1.0"]
TARGETS = {"counting_acc": 0.15, "zeroshot_acc1": -0.02}

if __name__ == "__main__":
    replicate("counting", VARIANT, TARGETS)
