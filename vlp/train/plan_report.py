"""``vlp train --dry-run``: print the plan of :mod:`vlp.train.plan` and write it as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlp.train.plan import make_plan

GIB = 2**30


def _n(value, spec: str = ",") -> str:
    return "unknown" if value is None else format(value, spec)


def _gib(nbytes) -> str:
    return "unknown" if nbytes is None else f"{nbytes / GIB:.2f} GiB"


def _batch_line(plan: dict) -> str:
    s, w = plan["schedule"], plan["world"]
    line = (
        f"batch        {s['micro_batch']:,} per process x {s['accum_steps']} accumulation step(s) x "
        f"{w['size']} process(es) = {s['global_batch']:,} global"
    )
    planned = plan["recipe"].get("global_batch")
    if isinstance(planned, int):
        line += f" (recipe: {planned:,} {'ok' if planned == s['global_batch'] else 'DIFFERS'})"
    return line


def _schedule_lines(plan: dict) -> list[str]:
    s = plan["schedule"]
    epochs = "unknown" if s["epochs"] is None else f"{s['epochs']:.2f}"
    warm = "" if s["warmup_fraction"] is None else f" ({100 * s['warmup_fraction']:.1f}% of the steps"
    warm += f", {s['warmup_samples']:,} samples)" if warm else ""
    clip = f"{s['grad_clip']:g}" if s["grad_clip"] else "off"
    return [
        f"steps        {_n(s['steps'])} ({s['steps_source']})",
        f"samples      {_n(s['samples_seen'])} seen = {epochs} epoch(s) of {_n(s['samples_per_epoch'])} "
        f"({s['samples_per_epoch_source']})",
        f"warm-up      {s['warmup_steps']:,} steps{warm}, then cosine from lr {s['lr']:g} to {s['min_lr']:g}",
        f"optimizer    AdamW, weight decay {s['weight_decay']:g}, betas {tuple(s['betas'])}, eps {s['eps']:g}, "
        f"grad clip {clip}, {s['precision']}",
    ]


def _cadence_lines(plan: dict) -> list[str]:
    c = plan["cadence"]
    every = f"every {c['checkpoint_every']:,} steps and at the end" if c["checkpoint_every"] else "at the end"
    lines = [
        f"checkpoints  {every}: {_n(c['checkpoints'])} in all, newest {c['keep_checkpoints']} kept, "
        f"{_gib(c['checkpoint_bytes'])} each (fp32 weights + AdamW moments), in {c['output_dir']}/checkpoints"
    ]
    e = plan["eval"]
    what = ", ".join(e["tasks"] + e["datasets"]) or "nothing (no eval.data, data.val_shards or eval.datasets)"
    if e["datasets"]:
        what += f" (root {e['dataset_root'] or 'unset'}, split {e['split']})"
    when = f"every {c['eval_every']:,} steps and at the end" if c["eval_every"] else "at the end"
    lines.append(f"eval         {when if e['any'] else 'never'}: {_n(c['evals'])} time(s): {what}")
    if c["val_every"]:
        lines.append(f"validation   every {c['val_every']:,} steps: {_n(c['validations'])} time(s)")
    return lines


def _data_lines(plan: dict) -> list[str]:
    lines = []
    for info in plan["data"].values():
        if not info["patterns"]:
            continue
        state = f"{info['found']:,} found, {info['missing']:,} missing" + (
            f", {info['remote']:,} remote (not checked)" if info["remote"] else ""
        )
        n = len(info["patterns"])
        lines.append(f"{'data':<13}{info['key']}: {info['listed']:,} shard(s) from {n} pattern(s): {state}")
    return lines


def _model_lines(plan: dict) -> list[str]:
    m = plan["model"]
    towers = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in m["by_tower"].items())
    line = f"model        {m['name']}: {_n(m['params'])} parameters, {_n(m['trainable'])} trainable"
    return [line + (f" ({towers})" if towers else "")]


def _memory_lines(plan: dict) -> list[str]:
    mem, w = plan["memory"], plan["world"]
    head = f"memory per device (estimate; backend {w['backend']}"
    if w["backend"] == "deepspeed":
        head += f", ZeRO stage {w['zero_stage']}"
    lines = [head + "):"]
    width = max((len(t["name"]) for t in mem["terms"]), default=10)
    for t in mem["terms"]:
        lines.append(f"  {t['name']:<{width}}  {t['bytes'] / GIB:8.2f} GiB   {t['how']}")
    if mem["total_bytes"] is not None:
        total = f"  {'total':<{width}}  {mem['total_bytes'] / GIB:8.2f} GiB"
        if "device_gib" in mem:
            total += f"   of the recipe's {mem['device_gib']} GiB: {'fits' if mem['fits'] else 'does NOT fit'}"
        lines.append(total)
    ref = mem.get("reference")
    if ref:
        lines.append(f"  for comparison, {ref['how']}: {_gib(ref['open_clip_clip_loss_bytes'])}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in mem["assumptions"]]
    return lines


def format_plan(plan: dict) -> str:
    """The plan as the lines ``vlp train --dry-run`` prints."""
    w, r = plan["world"], plan["recipe"]
    lines = [f"vlp plan of {plan['config'] or 'the default config'} (dry run: nothing trained or downloaded)"]
    if r:
        lines.append("recipe       " + ", ".join(f"{k} {v}" for k, v in r.items()))
    lines.append(f"world        {w['size']} process(es), from {w['source']}; backend {w['backend']}")
    lines.append(_batch_line(plan))
    lines += _schedule_lines(plan) + _cadence_lines(plan) + _data_lines(plan) + _model_lines(plan)
    lines += _memory_lines(plan)
    if plan["problems"]:
        lines.append("problems:")
        lines += [f"  {p['kind']}: {p['message']}" for p in plan["problems"]]
    ready = "ready to train" if plan["ready"] else "NOT ready to train (see the problems)"
    lines.append(f"plan: {ready}")
    return "\n".join(lines)


def run_dry_run(cfg, config_path, out: str | None, world_size: int | None = None) -> int:
    """Print the plan, write it as JSON to ``out`` (default ``<train.output_dir>/plan.json``, or
    ``./plan.json`` for a remote ``train.output_dir``) and say where it went. Returns 2 when the run
    would stop at start-up (an ``error`` problem), else 0. Under a launcher only rank 0 prints and
    writes."""
    plan = make_plan(cfg, config_path, world_size)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(format_plan(plan), flush=True)
    local_run = "://" not in cfg.train.output_dir  # a remote run folder: the plan stays here
    path = Path(out) if out else (Path(cfg.train.output_dir) if local_run else Path()) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    print(f"vlp: plan written to {path}", flush=True)
    return 2 if any(p["kind"] == "error" for p in plan["problems"]) else 0
