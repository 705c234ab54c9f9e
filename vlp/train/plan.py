"""The plan of a training run, resolved and checked without training (``vlp train --dry-run``).

What the run would do, from the config alone: the world size and global batch, steps, epochs and
samples seen, the warm-up, the checkpoint and evaluation cadence, and an estimate of the memory
per device (:mod:`vlp.train.plan_memory`). Nothing is trained, no weights are read or downloaded
and no process group is started, so it runs on a laptop before the data exist: shards that are
not there yet are named, and the epoch length comes from ``data.samples_per_epoch`` (or the
shards' ``sizes.json`` when they are there).

The world size is ``--world-size``, else the launcher's ``WORLD_SIZE``, else the recipe's
``# plan: nodes=N gpus_per_node=G`` comment line, else 1. That line (``configs/recipes/``) may
also give the published global batch and samples seen, which the plan checks, and the GPU memory
the memory estimate is compared with.

Problems are of three kinds: ``error`` (the run would stop at start-up whatever the data:
``vlp train --dry-run`` exits with status 2), ``missing`` (shards, eval data or environment
variables not there yet) and ``warning`` (it would run, but not as the recipe planned).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path

from vlp.config import ConfigError
from vlp.data.shard_io import is_url

PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
HEADER = "# plan:"


def recipe_header(path: str | Path | None) -> dict:
    """The ``key=value`` pairs of the ``# plan:`` lines in the opening comment of a config file."""
    out: dict = {}
    if not path or not Path(path).is_file():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break  # only the opening comment
        if line.startswith(HEADER):
            for item in line[len(HEADER) :].split():
                key, _, value = item.partition("=")
                out[key] = int(value) if value.isdigit() else value
    return out


def resolve_world(world_size: int | None, environ, header: dict) -> tuple[int, str]:
    """``(world size, where it came from)``: the flag, the launcher's environment, the recipe, 1."""
    if world_size:
        return world_size, "--world-size"
    if environ.get("WORLD_SIZE"):
        return int(environ["WORLD_SIZE"]), "WORLD_SIZE"
    if environ.get("SLURM_NTASKS") and int(environ["SLURM_NTASKS"]) > 1:
        return int(environ["SLURM_NTASKS"]), "SLURM_NTASKS"
    nodes, gpus = header.get("nodes"), header.get("gpus_per_node")
    if isinstance(nodes, int) and isinstance(gpus, int):
        return nodes * gpus, f"the recipe: {nodes} node(s) x {gpus} GPU(s)"
    return 1, "one process (no WORLD_SIZE, --world-size or recipe plan)"


def resolve_backend(backend: str, world: int) -> str:
    """What ``train.backend`` becomes on ``world`` processes (as vlp.train.backends decides)."""
    if backend == "auto":
        return "ddp" if world > 1 else "single"
    if backend == "ddp" and world == 1:
        return "single"
    return backend


def check_shards(patterns: list[str], key: str) -> dict:
    """What ``patterns`` expand to and which of those local files exist (never raises)."""
    from braceexpand import braceexpand

    listed, found, remote, missing, names = 0, [], 0, [], set()
    for pattern in patterns:
        names.update(PLACEHOLDER.findall(pattern))
        for url in braceexpand(pattern):
            if is_url(url):
                listed, remote = listed + 1, remote + 1
            elif any(ch in url for ch in "*?["):
                matches = sorted(glob.glob(url))
                listed += max(1, len(matches))
                found += [m for m in matches if Path(m).is_file()]
                missing += [] if matches else [url]
            else:
                listed += 1
                (found if Path(url).is_file() else missing).append(url)
    return {
        "key": key,
        "patterns": list(patterns),
        "listed": listed,
        "found": len(found),
        "remote": remote,
        "missing": len(missing),
        "missing_first": missing[:5],
        "placeholders": sorted(names),
        "_found_urls": found,
    }


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


class Problems(list):
    def add(self, kind: str, message: str) -> None:
        self.append({"kind": kind, "message": message})


def _placeholder_message(key: str, names: list[str], environ) -> str:
    unset = [n for n in names if not environ.get(n)] or names
    which = ", ".join(f"${{{n}}}" for n in unset)
    return (
        f"{key} holds {which}, which {'is' if len(unset) == 1 else 'are'} not set in the environment: export "
        f"{unset[0]}=... (vlp expands ${{NAME}} in config files) or pass --set {key}=..."
    )


def _data_checks(cfg, world: int, environ, problems: Problems) -> dict:
    d = cfg.data
    train = check_shards(d.train_shards, "data.train_shards")
    val = check_shards(d.val_shards, "data.val_shards")
    for info in (train, val):
        if any(not p.strip() for p in info["patterns"]):
            problems.add(
                "missing", f"{info['key']} has an empty pattern: was the variable unset when the shell expanded it?"
            )
        elif info["placeholders"]:
            problems.add("missing", _placeholder_message(info["key"], info["placeholders"], environ))
        elif info["missing"]:
            shown = ", ".join(info["missing_first"]) + (", ..." if info["missing"] > len(info["missing_first"]) else "")
            problems.add(
                "missing", f"{info['key']}: {info['missing']:,} of {info['listed']:,} shards not found: {shown}"
            )
    if not d.train_shards:
        problems.add("missing", "data.train_shards is empty: give shard patterns (--set data.train_shards=...)")
    if not d.resampled and train["listed"] and not train["placeholders"]:
        from vlp.data.shardlists import DataConfigError, check_readers

        try:
            check_readers(["shard"] * train["listed"], world, d.workers, d.resampled, "data.train_shards")
        except DataConfigError as e:
            problems.add("error", str(e))
    return {"train_shards": train, "val_shards": val}


def _epoch_length(cfg, train: dict) -> tuple[int | None, str]:
    d = cfg.data
    if d.samples_per_epoch > 0:
        return d.samples_per_epoch, "data.samples_per_epoch"
    if train["listed"] and train["found"] == train["listed"]:
        from vlp.data.shardlists import read_sizes

        n = read_sizes(train["_found_urls"])
        if n:
            return n, "the shards' sizes.json"
    return None, "unknown"


def _schedule(cfg, world: int, data: dict, problems: Problems) -> dict:
    from vlp.data.shardlists import DataConfigError
    from vlp.train.data import resolve_total_steps

    t, B = cfg.train, cfg.data.batch_size
    global_batch = B * world * t.accum_steps
    epoch, epoch_source = _epoch_length(cfg, data["train_shards"])
    if t.epochs > 0:
        source = f"train.epochs {t.epochs:g} x {epoch_source} / global batch"
        try:  # the trainer's own arithmetic, where the epoch length is known without the shards
            steps = resolve_total_steps(cfg, world) if cfg.data.samples_per_epoch > 0 or epoch else None
        except DataConfigError:
            steps = None
        if steps is None:
            problems.add(
                "missing",
                "train.epochs needs the epoch length: set data.samples_per_epoch or put sizes.json beside the shards",
            )
    else:
        steps, source = t.steps, "train.steps"
    seen = steps * global_batch if steps else None
    if steps and t.warmup_steps >= steps:
        problems.add("warning", f"train.warmup_steps {t.warmup_steps} >= the run's {steps} steps: no cosine decay")
    return {
        "micro_batch": B,
        "accum_steps": t.accum_steps,
        "global_batch": global_batch,
        "steps": steps,
        "steps_source": source,
        "samples_per_epoch": epoch,
        "samples_per_epoch_source": epoch_source,
        "epochs": seen / epoch if seen and epoch else None,
        "samples_seen": seen,
        "warmup_steps": t.warmup_steps,
        "warmup_fraction": t.warmup_steps / steps if steps else None,
        "warmup_samples": t.warmup_steps * global_batch,
        "lr": t.lr,
        "min_lr": t.lr * t.min_lr_ratio,
        "weight_decay": t.weight_decay,
        "betas": list(t.betas),
        "eps": t.eps,
        "grad_clip": t.grad_clip,
        "precision": cfg.model.precision,
    }


def _every(steps: int | None, every: int) -> int | None:
    """How many times an ``every``-step action runs, the final one at the end included."""
    if not steps:
        return None
    return steps // every + (1 if steps % every else 0) if every else 1


def _eval_data(cfg, problems: Problems, environ) -> dict:
    e = cfg.eval
    paths = e.data or ([cfg.data.val_shards[0]] * len(e.tasks) if cfg.data.val_shards else [])
    tasks = [f"{task} on {path}" for task, path in zip(e.tasks, paths)]
    out = {"tasks": tasks, "datasets": list(e.datasets), "dataset_root": e.dataset_root, "split": e.split}
    for path in e.data:  # (data.val_shards, their default, are checked with the training shards)
        if not is_url(path) and not all(Path(p).exists() for p in _expand(path)):
            problems.add("missing", f"eval.data: {path} not found")
    names = PLACEHOLDER.findall(e.dataset_root)
    if e.datasets and names:
        problems.add("missing", _placeholder_message("eval.dataset_root", names, environ))
    elif e.datasets and is_url(e.dataset_root):
        out["checked"] = "remote root: not read by the plan"
    elif e.datasets:
        from vlp.eval.datasets import EvalDataError
        from vlp.eval.named import named_specs

        try:  # what the trainer reads before its first step: the small metadata files
            named_specs(e.datasets, e.dataset_root, e.split)
        except EvalDataError as err:
            problems.add("missing", f"eval.datasets: {err}")
    out["any"] = bool(tasks or e.datasets)
    return out


def _cadence(cfg, steps: int | None, evaluates: bool, params: int | None) -> dict:
    from vlp.train.plan_memory import ema_decay
    from vlp.train.teacher import needs_teacher

    t = cfg.train
    # fp32 weights, two AdamW moments (+ the teacher, + the moving average)
    copies = 3 + needs_teacher(cfg.loss) + bool(ema_decay(t))
    return {
        "checkpoint_every": t.checkpoint_every,
        "checkpoints": _every(steps, t.checkpoint_every),
        "keep_checkpoints": t.keep_checkpoints,
        "checkpoint_bytes": 4 * params * copies if params else None,
        "eval_every": t.eval_every,
        "evals": _every(steps, t.eval_every) if evaluates else 0,
        "val_every": t.val_every,
        "validations": (steps // t.val_every if steps else None) if t.val_every and cfg.data.val_shards else 0,
        "log_every": t.log_every,
        "output_dir": t.output_dir,
    }


def _config_checks(cfg, world: int, backend: str, global_batch: int, problems: Problems) -> None:
    """What the trainer refuses at start-up, before any data: as errors here."""
    from vlp.train.backends import check_supported
    from vlp.train.run_folder import existing_checkpoints
    from vlp.train.teacher import needs_teacher

    d, t, c = cfg.data, cfg.train, cfg.loss.contrastive
    extra = bool(d.negatives.k or d.counterfactuals or cfg.loss.pair_weight)
    checks = [lambda: check_supported(cfg, extra_captions=extra, teacher=needs_teacher(cfg.loss))]
    if backend == "deepspeed":
        from vlp.train.deepspeed_config import build_config

        checks.append(lambda: build_config(cfg, world))
    for check in checks:
        try:
            check()
        except ConfigError as e:
            problems.add("error", str(e))
    if t.backend == "single" and world > 1:
        problems.add("error", f"train.backend=single but {world} processes are planned; use auto or ddp")
    if c.impl == "grouped" and c.group_size and world % c.group_size:
        problems.add("error", f"loss.contrastive.group_size={c.group_size} does not divide the world size {world}")
    q = cfg.loss.distill
    if q.enabled and q.queue_size % global_batch:
        problems.add("error", f"loss.distill.queue_size {q.queue_size} is not a multiple of the global batch")
    found = existing_checkpoints(Path(t.output_dir) / "checkpoints")
    if found and not (t.resume or t.overwrite):
        problems.add(
            "error",
            f"{t.output_dir} already holds another run's checkpoints ({len(found)}): the run would refuse to start; "
            "pass --resume latest or --overwrite, or choose another train.output_dir",
        )


def _recipe_checks(header: dict, schedule: dict, problems: Problems) -> None:
    planned = header.get("global_batch")
    if isinstance(planned, int) and planned != schedule["global_batch"]:
        problems.add(
            "warning",
            f"global batch {schedule['global_batch']} differs from the recipe's {planned}: set data.batch_size "
            f"(or train.accum_steps) so that batch x accumulation x world size = {planned}",
        )
    seen = header.get("samples_seen")
    if isinstance(seen, int) and schedule["samples_seen"] and abs(schedule["samples_seen"] - seen) > 0.01 * seen:
        problems.add("warning", f"{schedule['samples_seen']:,} samples seen differs from the recipe's {seen:,}")


def make_plan(cfg, config_path=None, world_size: int | None = None, environ=None) -> dict:
    """The plan of ``cfg`` (see the module docstring); JSON-serialisable."""
    from vlp.train.plan_memory import estimate, model_shape

    environ = os.environ if environ is None else environ
    header = recipe_header(config_path)
    world, world_source = resolve_world(world_size, environ, header)
    backend = resolve_backend(cfg.train.backend, world)
    problems = Problems()
    data = _data_checks(cfg, world, environ, problems)
    schedule = _schedule(cfg, world, data, problems)
    _config_checks(cfg, world, backend, schedule["global_batch"], problems)
    _recipe_checks(header, schedule, problems)
    evaluation = _eval_data(cfg, problems, environ)
    shape = model_shape(cfg.model)
    memory = estimate(cfg, shape, world, backend)
    device_gib = header.get("gpu_memory_gib")
    if isinstance(device_gib, int) and memory["total_gib"]:
        memory["device_gib"] = device_gib
        memory["fits"] = memory["total_gib"] <= device_gib
        if not memory["fits"]:
            problems.add("warning", f"the estimate, {memory['total_gib']} GiB, exceeds the recipe's {device_gib} GiB")
    for info in data.values():
        info.pop("_found_urls")
    model = {
        "name": cfg.model.name,
        "params": shape.params,
        "trainable": shape.trainable,
        "by_tower": shape.by_tower,
        "towers": [dataclasses.asdict(t) for t in shape.towers],
    }
    return {
        "config": str(config_path) if config_path else None,
        "recipe": header,
        "world": {
            "size": world,
            "source": world_source,
            "backend": backend,
            "zero_stage": cfg.train.deepspeed.zero_stage if backend == "deepspeed" else None,
        },
        "schedule": schedule,
        "cadence": _cadence(cfg, schedule["steps"], evaluation["any"], shape.params),
        "data": data,
        "eval": evaluation,
        "model": model,
        "memory": memory,
        "problems": list(problems),
        "ready": not problems or all(p["kind"] == "warning" for p in problems),
    }
