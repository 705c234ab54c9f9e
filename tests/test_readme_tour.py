"""The README's tour, line by line. Every command runs at a reduced size, in the README's order, in a
folder laid out like the repository root (later lines use what earlier lines made), or, where the suite
cannot afford it and another test runs it end to end, is read by its own program's argument parser and
the files it names are checked. The Python snippet runs last, on what the tour made.

``TOUR`` holds one entry per tour command, keyed by the command as the shell splits it (words joined by
one space): a new tour line fails here until it has an entry, and an entry fails when its line is gone."""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from braceexpand import braceexpand

from tests.conftest import REPO, run_main

README = REPO / "README.md"
LINKED = ("configs", "tools", "launch")  # the repository folders the tour reads, linked into its root

# a reduced training run: 2 steps of 16 samples with a checkpoint at the end (step_00000002.pt)
TRAIN = ("--set", "train.steps=2", "--set", "data.batch_size=16", "--set", "train.checkpoint_every=2")
# ... without the final evaluation on the 500-image held-out sets, which costs more than the training: the
# first training line and the eval line evaluate, the rest need not repeat it
NO_EVAL = (*TRAIN, "--set", "data.val_shards=[]", "--set", "eval.tasks=[]", "--set", "eval.data=[]")
# the reduced runs' checkpoints: runs/tour/demo goes on to step 4 when the resume line continues it
DEMO_STEP = {"step_00000800.pt": "step_00000004.pt"}
COCA_STEP = {"step_00000400.pt": "step_00000002.pt"}


@dataclass(frozen=True)
class Run:
    """Run the command with ``add`` appended and every word containing a ``replace`` key changed to
    that key's value; ``debian``: a Debian package it needs (without it: parse-checked, then skipped)."""

    add: tuple[str, ...] = ()
    replace: dict = field(default_factory=dict)
    debian: str = ""


@dataclass(frozen=True)
class ParseOnly:
    """Too slow for the suite: read by its program's parser and the files it names checked. ``tests``
    (``path::function``) run what it runs end to end."""

    tests: tuple[str, ...]


REPLICATE_TEST = ("tests/test_replicate.py::test_quick_replication_prints_one_json_object",)


TOUR = {
    "vlp shards --synthetic --num-samples 2000 --out data/shapes": Run(
        ("--num-samples", "64", "--max-samples-per-shard", "32")  # 2 shards, as the tour's 2,000 make
    ),
    "vlp shards --captions runs/demo/data/eval/counting.jsonl --out data/mine": Run(),  # 500 small PNGs: a second
    "vlp train --config configs/demo.yaml --set train.output_dir=runs/tour/demo": Run(TRAIN),
    "vlp train --config configs/demo.yaml --set train.output_dir=runs/tour/demo --resume latest "
    "--set train.steps=800": Run((*NO_EVAL, "--set", "train.steps=4")),  # 2 steps on from the line above's step 2
    "vlp train --config configs/demo.yaml --set train.lr=3e-4 --set data.batch_size=64 "
    "--set train.output_dir=runs/tour/lr": Run(NO_EVAL),
    "torchrun --standalone --nproc_per_node 2 -m vlp.train --config configs/demo.yaml "
    "--set train.output_dir=runs/tour/ddp": Run(NO_EVAL),
    "vlp train --config configs/demo.yaml --set loss.contrastive.impl=tiled --set train.output_dir=runs/tour/tiled": (
        Run(NO_EVAL)
    ),
    "vlp eval --checkpoint runs/tour/demo/checkpoints/step_00000800.pt --task counting "
    "--data runs/demo/data/eval/counting.jsonl --output runs/tour/counting.json": Run(replace=DEMO_STEP),
    "vlp train --config configs/demo_coca.yaml --set train.output_dir=runs/tour/coca": Run(NO_EVAL),
    "vlp caption --checkpoint runs/tour/coca/checkpoints/step_00000400.pt --strategy beam "
    "--images runs/demo/data/eval/classification/red_circle": Run(("--max-len", "8"), COCA_STEP),
    "vlp train --config configs/demo_albef.yaml --set train.output_dir=runs/tour/albef": Run(NO_EVAL),
    "vlp negatives --in runs/demo/data/train/shapes-{000000..000011}.tar --out data/shapes-neg --k 4": Run(),
    "vlp train --config configs/demo.yaml --set data.train_shards=['data/shapes-neg/shapes-{000000..000011}.tar'] "
    "--set data.negatives.k=2 --set data.counterfactuals=true --set loss.negatives.image_grounded_weight=1 "
    "--set train.output_dir=runs/tour/negclip": Run(NO_EVAL),
    # 2 to 6 training runs of 600 steps each, 15 minutes and more
    "python tools/replicate_counting.py --seeds 0 1": ParseOnly(REPLICATE_TEST),
    "python tools/replicate_negatives.py --seeds 0 1 --eval-every 100": ParseOnly(REPLICATE_TEST),
    "python tools/replicate_pairs.py --seeds 0 1 2": ParseOnly(REPLICATE_TEST),
    "python tools/replicate_negatives.py --seeds 0 1 2 --set model.name=debug-resnet "
    "--variant-set data.counterfactuals=true": ParseOnly(REPLICATE_TEST),
    "python tools/compositional_errors.py --checkpoint runs/tour/demo/checkpoints/step_00000800.pt": Run(
        ("--num", "20"), DEMO_STEP
    ),
    # a second 2-process job (10 s reduced, on a quiet machine) would take this file past its budget, and
    # DeepSpeed is an optional extra; the DRY_RUN line is read by torchrun's and vlp's parsers instead
    "NPROC=2 launch/torchrun_single_node.sh --set train.backend=deepspeed --set train.deepspeed.zero_stage=2 "
    "--set train.output_dir=runs/tour/zero2": ParseOnly(
        (
            "tests/test_deepspeed.py::test_zero_stages_match_ddp_and_resume",  # torchrun, ZeRO-2
            "tests/test_launch.py::test_single_node_two_processes",  # this script
        )
    ),
    "vlp export --checkpoint runs/tour/demo/checkpoints/step_00000800.pt --format open_clip --out exported/open_clip": (
        Run(replace=DEMO_STEP)
    ),
    "vlp export --checkpoint runs/tour/demo/checkpoints/step_00000800.pt --format hf --out exported/hf --check": Run(
        replace=DEMO_STEP
    ),
    "vlp shards --from openclipart --out runs/lit/data/openclipart": Run(("--limit", "64"), debian="openclipart-svg"),
    "vlp shards --from fashion-mnist --out runs/lit/data/fashion-mnist --per-class-train 300 --per-class-test 100": Run(
        ("--per-class-train", "5", "--per-class-test", "5"), debian="dataset-fashion-mnist"
    ),
    # encoding 6,447 clip-art images with the pretrained trunks takes minutes
    "vlp train --config configs/lit_openclipart.yaml --set train.output_dir=runs/tour/lit": ParseOnly(
        ("tests/test_real_data.py::test_quick_real_demo_trains_evaluates_and_reports",)
    ),
}


def tour_blocks() -> tuple[list[list[str]], str]:
    """The README tour's commands, each as the shell splits it (``\\``-continued lines joined, comments
    dropped), and its Python snippet."""
    tour = README.read_text().split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", tour, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    commands, line = [], ""
    for physical in bash.splitlines():
        if physical.rstrip().endswith("\\"):
            line += physical.rstrip()[:-1] + " "
            continue
        words = shlex.split(line + physical, comments=True)
        if words:
            commands.append(words)
        line = ""
    assert not line, "the tour's last line ends in a backslash"
    return commands, python


COMMANDS, SNIPPET = tour_blocks()


def key(words: list[str]) -> str:
    return " ".join(words)


def reduced(words: list[str], entry: Run) -> list[str]:
    for old, new in entry.replace.items():
        assert any(old in w for w in words), f"{old} (to replace) is not in {key(words)}"
        words = [w.replace(old, new) for w in words]
    return [*words, *entry.add]


def split_env(words: list[str]) -> tuple[dict, list[str]]:
    """Leading ``NAME=value`` words (the shell's per-command environment) and the command after them."""
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words[0].split("=", 1)
        env[name] = value
        words = words[1:]
    return env, words


# --- reading a command with its program's own parser ------------------------------------------------


def parse(read, argv: list[str], what: str):
    """``read(argv)`` (an argparse ``parse_args``); a usage error fails the test naming the command."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return read(argv)
        except SystemExit as e:
            raise AssertionError(f"{what}\nits parser refuses {argv}:\n{err.getvalue()}") from e


def vlp_inputs(args) -> list[str]:
    """The files and folders a parsed ``vlp`` command reads (not those it writes)."""
    paths = [getattr(args, name, None) for name in ("config", "checkpoint", "captions", "images")]
    if getattr(args, "resume", None) != "latest":
        paths.append(getattr(args, "resume", None))
    paths += getattr(args, "data", None) or []
    if getattr(args, "inputs", None):
        paths += list(braceexpand(args.inputs))
    return [p for p in paths if p]


def check_vlp(argv: list[str], what: str, root: Path) -> list[str]:
    """``vlp ARGV`` read by vlp's parser, a train command's config loaded with its overrides (unknown keys
    and wrong types raise); the paths it reads."""
    from vlp.cli import build_parser
    from vlp.config import load_config

    args = parse(build_parser().parse_args, argv, what)
    if args.command == "train":
        overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
        load_config(root / args.config, overrides)
    return vlp_inputs(args)


def check_torchrun(argv: list[str], what: str, root: Path) -> list[str]:
    from torch.distributed.run import get_args_parser

    args = parse(get_args_parser().parse_args, argv, what)
    assert args.module and args.training_script == "vlp.train", f"{what}\ntorchrun should run -m vlp.train"
    return check_vlp(["train", *args.training_script_args], what, root)


@contextlib.contextmanager
def tools_importable():
    """tools/*.py importable the way they import each other (``from replicate_common import ...``)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        yield
    finally:
        sys.path.remove(str(REPO / "tools"))


def check_tool(script: str, argv: list[str], what: str, root: Path) -> list[str]:
    """A ``python tools/NAME.py`` command read by the tool's own parser: ``build_parser()``, or for
    replicate_*.py ``replicate_common.parse_args`` with the script's own options (their --set and
    --variant-set overrides loaded onto the demo config); the paths it reads."""
    from vlp.config import load_config

    name = Path(script).stem
    with tools_importable():
        module = importlib.import_module(name)
        if name.startswith("replicate_"):
            common = importlib.import_module("replicate_common")
            options = getattr(module, "add_options", None)

            def read(a):
                return common.parse_args(name.removeprefix("replicate_"), add_options=options, argv=a)

            args = parse(read, argv, what)
            load_config(root / "configs" / "demo.yaml", [*args.overrides, *args.variant_sets])
            return []
        args = parse(module.build_parser().parse_args, argv, what)
    return [args.checkpoint] if args.checkpoint else []


def dry_run(script: str, argv: list[str], env: dict, root: Path) -> list[str]:
    """The command a launch/ script would run (its DRY_RUN=1 line, split as the shell splits it)."""
    proc = subprocess.run(
        ["bash", str(REPO / script), *argv],
        cwd=root,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stdout + proc.stderr
    return shlex.split(proc.stdout)


def check_command(words: list[str], what: str, root: Path = REPO) -> list[str]:
    """Read ``words`` with the parser of the program it runs; the files and folders it reads, scripts
    included (relative to ``root``)."""
    env, cmd = split_env(words)
    program, argv = cmd[0], cmd[1:]
    if program == "vlp":
        return check_vlp(argv, what, root)
    if program == "torchrun":
        return check_torchrun(argv, what, root)
    if program == "python" and argv[0].startswith("tools/"):
        return [argv[0], *check_tool(argv[0], argv[1:], what, root)]
    if program.startswith("launch/"):
        launched = dry_run(program, argv, env, root)
        assert launched[0] == "torchrun", f"{what}\nruns {launched}"
        return [program, *check_command(launched, what, root)]
    raise AssertionError(f"{what}\nthis test knows no parser for {program}: teach check_command")


# --- running the tour ------------------------------------------------------------------------------


def debian_missing(package: str) -> bool:
    from vlp.data.sources import fashion_mnist, openclipart
    from vlp.demo_real import missing_requirements

    missing = missing_requirements(openclipart.DEFAULT_SOURCE, fashion_mnist.DEFAULT_SOURCE)
    return any(f"Debian package {package}" in m for m in missing)


def execute(words: list[str], root: Path) -> None:
    """Run ``words`` in ``root``: vlp commands in this process, the rest (torchrun, tools, launch
    scripts) as the subprocesses they are."""
    env, cmd = split_env(words)
    if cmd[0] == "vlp":
        run_main(*cmd[1:], cwd=root, env=env)
        return
    if cmd[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    elif cmd[0] == "python":
        argv = [sys.executable, *cmd[1:]]
    else:
        argv = ["bash", cmd[0], *cmd[1:]]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(argv, cwd=root, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{key(words)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


class Tour:
    """The tour's root folder and its commands run so far, in the README's order."""

    def __init__(self, root: Path):
        self.root = root
        self.skipped: list[str] = []  # per command run or checked: "" or why it was skipped
        self.failed = ""

    def run_through(self, index: int) -> str:
        """Run (or check) every command up to ``index``; why that one was skipped, or ""."""
        while len(self.skipped) <= index:
            words = COMMANDS[len(self.skipped)]
            assert not self.failed, f"an earlier tour line failed: {self.failed}"
            try:
                self.skipped.append(self.run_one(words))
            except BaseException:
                self.failed = key(words)
                raise
        return self.skipped[index]

    def run_one(self, words: list[str]) -> str:
        entry = TOUR.get(key(words))
        assert entry is not None, f"no entry in TOUR for the tour line\n{key(words)}"
        check_command(words, key(words), self.root)
        small = reduced(words, entry) if isinstance(entry, Run) else words
        reads = check_command(small, key(small), self.root)
        missing = [p for p in reads if not (self.root / p).exists() and not glob.glob(str(self.root / p))]
        assert not missing, f"{key(words)}\nreads what neither the repository nor an earlier tour line has: {missing}"
        if isinstance(entry, ParseOnly):
            return ""
        if entry.debian and debian_missing(entry.debian):
            return f"needs the Debian package {entry.debian} (parsed and checked only)"
        execute(small, self.root)
        return ""


@pytest.fixture(scope="module")
def tour(demo_data, tmp_path_factory) -> Tour:
    """A folder laid out like the repository root: configs/, tools/ and launch/ linked, and the
    shapes data of `vlp demo` as runs/demo/data."""
    root = tmp_path_factory.mktemp("tour")
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    (root / "runs" / "demo").mkdir(parents=True)
    (root / "runs" / "demo" / "data").symlink_to(demo_data)
    return Tour(root)


def test_every_tour_line_has_an_entry_and_every_entry_a_line():
    keys = [key(words) for words in COMMANDS]
    assert len(keys) >= 20 and len(set(keys)) == len(keys), keys
    assert [k for k in keys if k not in TOUR] == [], "tour lines without an entry in TOUR"
    assert [k for k in TOUR if k not in keys] == [], "TOUR entries without a tour line"
    for entry in TOUR.values():  # the tests that run the parse-only lines end to end are still there
        for test in getattr(entry, "tests", ()):
            path, function = test.split("::")
            assert f"def {function}(" in (REPO / path).read_text(), f"{test} is gone"


def command_id(words: list[str]) -> str:
    cmd = split_env(words)[1]
    name = cmd[1] if cmd[0] == "vlp" else Path(cmd[1] if cmd[0] == "python" else cmd[0]).stem
    return f"{COMMANDS.index(words):02d}-{name}"


@pytest.mark.parametrize("words", COMMANDS, ids=command_id)
def test_tour_line_parses(words):
    """Each line as its program reads it (no file checks: many files are made by earlier lines)."""
    check_command(words, key(words))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[command_id(w) for w in COMMANDS])
def test_tour_line_runs_after_the_lines_before_it(tour, index):
    skipped = tour.run_through(index)
    if skipped:
        pytest.skip(skipped)


@pytest.mark.slow
def test_python_snippet_loads_what_the_tour_made(tour, monkeypatch):
    tour.run_through(len(COMMANDS) - 1)
    code = SNIPPET
    for old, new in DEMO_STEP.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tour.root)
    names: dict = {}
    exec(compile(code, f"{README} (the tour's Python snippet)", "exec"), names)
    assert type(names["hf_model"]).__name__ == "CLIPModel" and callable(names["preprocess"])
