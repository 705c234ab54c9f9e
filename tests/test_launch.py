"""launch/ scripts: the exact commands they run (dry runs, read back by the launchers' own parsers),
their documented variables, and real 2-process runs on CPU (gloo) through torchrun, accelerate and
the DeepSpeed launcher, including an elastic restart that resumes from the latest checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import free_port
from vlp.train.logging import read_metrics

LAUNCH = REPO / "launch"
SCRIPTS = [
    "torchrun_single_node.sh",
    "torchrun_multi_node.sh",
    "slurm.sbatch",
    "deepspeed_hostfile.sh",
    "accelerate.sh",
]
VENV_BIN = str(Path(sys.executable).parent)
BASH_OWN = {"BASH_SOURCE", "IFS", "PATH", "HOME"}


def header_and_body(text: str) -> tuple[str, str]:
    """The leading comment block (shebang and #SBATCH lines included) and the rest."""
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "\n".join(lines[:n]), "\n".join(lines[n:])


def environment_reads(body: str) -> set[str]:
    """Upper-case variables read as ``$VAR`` or ``${VAR...}``: the scripts' convention for the
    environment (script-local names are lower case)."""
    return set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", body)) - BASH_OWN


def undocumented_variables(text: str) -> set[str]:
    """Variables the body reads that the header never names."""
    header, body = header_and_body(text)
    return {v for v in environment_reads(body) if not re.search(rf"\b{v}\b", header)}


def script_variables() -> set[str]:
    return set().union(*(environment_reads(header_and_body((LAUNCH / n).read_text())[1]) for n in SCRIPTS))


def clean_env(**overrides) -> dict:
    """This process's environment without anything the scripts read, then ``overrides`` (None unsets)."""
    drop = script_variables()
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(PATH=f"{VENV_BIN}:{env['PATH']}", CUDA_VISIBLE_DEVICES="")
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def dry_run(script: str, *args: str, check: bool = True, **env) -> list[str] | subprocess.CompletedProcess:
    """The command ``script ARGS`` would run with ``env``, split as the shell would split it."""
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=REPO,
        env=clean_env(DRY_RUN=1, **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def torchrun_args(cmd: list[str]):
    """torchrun's own reading of the arguments after the ``torchrun`` word of ``cmd``."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(cmd[cmd.index("torchrun") + 1 :])


FORWARDED = ["--set", "data.train_shards=['/data/a b/x-{000000..000009}.tar']", "--set", "train.lr=3e-4"]


# --- the scripts themselves -------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_strict_bash_and_documents_its_variables(name):
    path = LAUNCH / name
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    header, _ = header_and_body(text)
    assert "DRY_RUN" in header and "Example" in header
    assert not undocumented_variables(text), f"{name}: document these at the top: {undocumented_variables(text)}"
    if name.endswith(".sh"):
        assert os.access(path, os.X_OK)


def test_undocumented_variable_check_can_fail():
    script = "#!/usr/bin/env bash\n# Variables:\n#   NPROC  processes\nset -euo pipefail\necho $NPROC ${SECRET:-1}\n"
    assert undocumented_variables(script) == {"SECRET"}


def test_sbatch_header_comes_before_any_command():
    header, body = header_and_body((LAUNCH / "slurm.sbatch").read_text())
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", header, re.M))
    assert options["ntasks-per-node"] == "1" and {"nodes", "gpus-per-node", "time"} <= set(options)
    assert "#SBATCH" not in body  # sbatch ignores directives after the first command


# --- dry runs: the exact command ----------------------------------------------------------------


def test_single_node_dry_run():
    cmd = dry_run("torchrun_single_node.sh", *FORWARDED)
    assert cmd[:2] == ["torchrun", "--standalone"]
    args = torchrun_args(cmd)
    assert args.standalone and args.nproc_per_node == "1" and args.module
    assert args.training_script == "vlp.train"
    assert args.training_script_args == ["--config", "configs/demo.yaml", *FORWARDED]

    args = torchrun_args(dry_run("torchrun_single_node.sh", NPROC=3, CONFIG="my.yaml", MASTER_PORT=1234))
    assert not args.standalone and (args.nproc_per_node, args.master_addr, args.master_port) == ("3", "127.0.0.1", 1234)
    assert args.training_script_args == ["--config", "my.yaml"]


def test_single_node_counts_visible_gpus(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    fake.chmod(0o755)
    path = f"{tmp_path}:{VENV_BIN}:{os.environ['PATH']}"
    assert dry_run("torchrun_single_node.sh", CUDA_VISIBLE_DEVICES=None, PATH=path)[3] == "4"
    assert dry_run("torchrun_single_node.sh", CUDA_VISIBLE_DEVICES="2,3", PATH=path)[3] == "2"
    assert dry_run("torchrun_single_node.sh", CUDA_VISIBLE_DEVICES="", PATH=path)[3] == "1"


UNSHARED_STORE = ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun"]  # restarts need it, see the script


def test_multi_node_dry_run():
    cmd = dry_run("torchrun_multi_node.sh", *FORWARDED, NPROC=2)
    assert cmd[:3] == UNSHARED_STORE
    args = torchrun_args(cmd)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("1", "2", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts, args.rdzv_conf) == ("127.0.0.1:29400", "vlp", 3, "")
    assert args.training_script_args == ["--config", "configs/demo.yaml", "--resume", "latest", *FORWARDED]

    env = dict(NNODES=4, NODE_RANK=2, RDZV_ENDPOINT="10.0.0.1:29555", RDZV_ID="clip7", NPROC=8, MAX_RESTARTS=0)
    args = torchrun_args(dry_run("torchrun_multi_node.sh", "--resume", "runs/x/step_00000004.pt", **env))
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.max_restarts) == ("4", 2, "8", 0)
    assert (args.rdzv_endpoint, args.rdzv_id, args.rdzv_conf) == ("10.0.0.1:29555", "clip7", "is_host=false")
    assert args.training_script_args[-2:] == ["--resume", "runs/x/step_00000004.pt"]  # the last --resume wins
    node0 = dry_run("torchrun_multi_node.sh", **{**env, "NODE_RANK": 0, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": 0})
    assert node0[1] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0" and torchrun_args(node0).rdzv_conf == "is_host=true"

    proc = dry_run("torchrun_multi_node.sh", check=False, NNODES=2)
    assert proc.returncode == 2 and "RDZV_ENDPOINT" in proc.stderr and not proc.stdout


FAKE_SCONTROL = """#!/bin/sh
[ "$*" = "show hostnames gpu-[07-09]" ] || exit 1
printf "%s\\n" gpu-07 gpu-08 gpu-09
"""


def test_slurm_dry_run_with_fake_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text(FAKE_SCONTROL)
    fake.chmod(0o755)
    slurm = dict(
        PATH=f"{tmp_path}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-[07-09]",
        SLURM_JOB_NUM_NODES=3,
        SLURM_JOB_ID=4242,
        SLURM_GPUS_ON_NODE=4,
        SLURM_CPUS_PER_TASK=16,
    )
    cmd = dry_run("slurm.sbatch", *FORWARDED, **slurm)
    split = cmd.index("torchrun")
    assert shlex.join(cmd[: split - 2]) == "srun --nodes 3 --ntasks-per-node 1 --cpus-per-task 16 --kill-on-bad-exit=1"
    assert cmd[split - 2 : split + 1] == UNSHARED_STORE
    args = torchrun_args(cmd)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("3", "4", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts) == ("gpu-07:29742", "4242", 3)
    assert args.training_script == "vlp.train"
    assert args.training_script_args == ["--config", "configs/demo.yaml", "--resume", "latest", *FORWARDED]

    cmd = dry_run("slurm.sbatch", **slurm, NPROC=2, MASTER_PORT=30000, MAX_RESTARTS=1, CONFIG="c.yaml")
    args = torchrun_args(cmd)
    assert (args.nproc_per_node, args.rdzv_endpoint, args.max_restarts) == ("2", "gpu-07:30000", 1)
    assert args.training_script_args[:2] == ["--config", "c.yaml"]

    proc = dry_run("slurm.sbatch", check=False, PATH=slurm["PATH"])
    assert proc.returncode == 2 and "sbatch" in proc.stderr


def test_deepspeed_dry_run_parses_with_the_real_launcher():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    hostfile = str(LAUNCH / "hostfile.example")
    env = dict(HOSTFILE=hostfile, INCLUDE="worker-0:0,1@worker-1", MASTER_ADDR="10.0.0.1", MASTER_PORT=29555)
    cmd = dry_run("deepspeed_hostfile.sh", *FORWARDED, **env, DS_ARGS="--no_ssh_check --ssh_port 2222")
    assert cmd[0] == "deepspeed"
    args = runner.parse_args(cmd[1:])
    assert (args.hostfile, args.include) == (hostfile, env["INCLUDE"])
    assert (args.master_addr, args.master_port) == ("10.0.0.1", 29555)
    assert args.no_ssh_check and args.ssh_port == 2222 and args.module and args.no_local_rank
    assert args.user_script == "vlp.train"
    assert args.user_args == ["--config", "configs/demo.yaml", "--set", "train.backend=deepspeed", *FORWARDED]
    assert list(runner.fetch_hostfile(hostfile).items()) == [("worker-0", 8), ("worker-1", 8)]

    args = runner.parse_args(dry_run("deepspeed_hostfile.sh", NUM_NODES=1, NUM_GPUS=2, CONFIG="c.yaml")[1:])
    assert (args.num_nodes, args.num_gpus, args.include, args.master_addr, args.master_port) == (1, 2, "", "", 29500)
    assert args.hostfile == runner.DLTS_HOSTFILE and args.user_args[:2] == ["--config", "c.yaml"]


def test_deepspeed_refuses_what_it_would_get_wrong():
    proc = dry_run("deepspeed_hostfile.sh", check=False, HOSTFILE="/nonexistent/hostfile")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not proc.stdout
    proc = dry_run("deepspeed_hostfile.sh", check=False, INCLUDE="worker-0", NUM_GPUS=2)
    assert proc.returncode == 2 and "INCLUDE" in proc.stderr and not proc.stdout


def test_accelerate_dry_run_and_config():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cmd = dry_run("accelerate.sh", *FORWARDED, NPROC=4)
    assert cmd[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(cmd[2:])
    assert Path(args.config_file).resolve() == LAUNCH / "accelerate_config.yaml"
    assert (args.num_processes, args.main_process_port, args.module) == (4, 0, True)
    assert args.training_script == "vlp.train"
    assert args.training_script_args == ["--config", "configs/demo.yaml", *FORWARDED]
    args = launch_command_parser().parse_args(
        dry_run("accelerate.sh", ACCELERATE_CONFIG="a.yaml", MASTER_PORT=29555, CONFIG="c.yaml")[2:]
    )
    assert (args.config_file, args.num_processes, args.main_process_port) == ("a.yaml", 1, 29555)

    config = load_config_from_file(str(LAUNCH / "accelerate_config.yaml"))  # unknown keys raise
    assert config.distributed_type == "MULTI_GPU" and config.num_machines == 1 and not config.use_cpu


# --- real runs on CPU ----------------------------------------------------------------------------


def _sets(shards, out, *extra) -> list[str]:
    base = [
        f"data.train_shards=['{shards['train']}']",
        "data.val_shards=[]",
        "eval.data=[]",
        "eval.tasks=[]",
        "data.batch_size=8",
        "data.workers=0",
        "train.device=cpu",
        f"train.output_dir={out}",
        "train.warmup_steps=1",
        "train.log_every=1",
        *extra,
    ]
    return [a for s in base for a in ("--set", s)]


def _launch(script: str, args: list[str], timeout: int = 120, **env) -> subprocess.CompletedProcess:
    """Run a launch script; on a timeout, SIGTERM its process group first so that the launcher stops
    its workers (torchrun starts each in a session of its own, out of reach of a group kill)."""
    cmd = ["bash", str(LAUNCH / script), *args]
    full_env = clean_env(**{"OMP_NUM_THREADS": 1, "PYTHONPATH": REPO, **env})
    with subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, stdout[-4000:] + stderr[-8000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _trained_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _checkpoint_world(path: Path) -> int:
    import torch

    return torch.load(path, weights_only=True)["world"]


@pytest.mark.slow
def test_single_node_two_processes(shapes_shards, tmp_path):
    out = tmp_path / "run"
    sets = _sets(shapes_shards, out, "train.steps=3", "train.checkpoint_every=0")
    proc = _launch("torchrun_single_node.sh", sets, NPROC=2)
    assert f"outputs in {out}" in proc.stdout
    assert _trained_steps(out) == [1, 2, 3]
    assert _checkpoint_world(out / "checkpoints" / "step_00000003.pt") == 2


CRASH_ONCE = """
import os, pathlib, threading, time

def _die_after_first_checkpoint(out):
    latest = pathlib.Path(out) / "checkpoints" / "latest"
    while not latest.exists():
        time.sleep(0.01)
    (pathlib.Path(out) / "crashed").write_text(latest.read_text())
    os._exit(17)

if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    threading.Thread(target=_die_after_first_checkpoint, args=(os.environ["CRASH_RUN_DIR"],), daemon=True).start()
"""


@pytest.mark.slow
def test_elastic_restart_resumes_from_latest_checkpoint(shapes_shards, tmp_path):
    """Rank 1 dies after the first checkpoint; torchrun restarts both processes and, with the
    `--resume latest` the script always passes, they continue from that checkpoint to the end. The
    first attempt found no checkpoint and started fresh: a relaunched job and a restarted one take the
    same path."""
    out = tmp_path / "run"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CRASH_ONCE)  # imported at every python start
    env = dict(NPROC=2, MAX_RESTARTS=1, RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", CRASH_RUN_DIR=out)
    sets = _sets(shapes_shards, out, "train.steps=6", "train.checkpoint_every=2")
    proc = _launch("torchrun_multi_node.sh", sets, **env, PYTHONPATH=f"{tmp_path / 'inject'}:{REPO}")
    assert "starting fresh" in proc.stderr, proc.stderr[-3000:]
    crashed_at = (out / "crashed").read_text()
    assert f"vlp: resumed from {out / 'checkpoints' / crashed_at}" in proc.stdout, proc.stdout
    assert _trained_steps(out) == [1, 2, 3, 4, 5, 6]  # no duplicates from the killed attempt
    assert _checkpoint_world(out / "checkpoints" / "step_00000006.pt") == 2


@pytest.mark.slow
def test_accelerate_two_processes(shapes_shards, tmp_path):
    """accelerate's MULTI_GPU mode runs torchrun, which works on CPU too (vlp picks gloo)."""
    out = tmp_path / "run"
    sets = _sets(shapes_shards, out, "train.steps=3", "train.checkpoint_every=0")
    _launch("accelerate.sh", sets, NPROC=2)
    assert _trained_steps(out) == [1, 2, 3]
    assert _checkpoint_world(out / "checkpoints" / "step_00000003.pt") == 2


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_processes(shapes_shards, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = dict(
        HOSTFILE=hostfile,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        DS_ARGS="--no_ssh_check",  # one host: DeepSpeed runs it locally, but checks ssh first
        DS_ACCELERATOR="cpu",
    )
    sets = _sets(shapes_shards, out, "train.steps=3", "train.checkpoint_every=0")
    proc = _launch("deepspeed_hostfile.sh", sets, timeout=240, **env)
    assert _trained_steps(out) == [1, 2, 3]
    checkpoint = re.search(rf"vlp: trained 3 steps; outputs in {re.escape(str(out))} \(checkpoint (.+)\)", proc.stdout)
    assert checkpoint and Path(checkpoint[1]).exists(), proc.stdout
