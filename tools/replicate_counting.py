"""Counting loss ("Teaching CLIP to Count to Ten"), replicated small: the `debug` CLIP on the shapes
data, with and without counting counterfactuals and the counting loss (lambda = 1), same steps
and seed. Target (issue #7): held-out counting accuracy +15 points, zero-shot at most -2 points.

    python tools/replicate_counting.py --seeds 0 1          # about 15 minutes on 2 CPU cores
    python tools/replicate_counting.py --quick --json       # a smoke run, one JSON object
"""

from replicate_common import replicate

VARIANT = ["data.counterfactuals=true", "loss.counting_weight=1.0"]
TARGETS = {"counting_acc": 0.15, "zeroshot_acc1": -0.02}

if __name__ == "__main__":
    replicate("counting", VARIANT, TARGETS)
