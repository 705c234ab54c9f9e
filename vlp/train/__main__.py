"""``python -m vlp.train --config FILE [--set k=v ...]``: the torchrun / SLURM entry point."""

from vlp.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["train", *sys.argv[1:]]))
