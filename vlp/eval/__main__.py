"""``python -m vlp.eval --task ... --data ...``: the torchrun entry point of ``vlp eval``."""

from vlp.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["eval", *sys.argv[1:]]))
