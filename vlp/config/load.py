"""Loading the configuration: YAML files, ``--set a.b=c`` overrides and checkpoints' saved dicts,
converted strictly to the dataclass tree (an unknown key, a wrong type: one line naming both)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vlp.config.checks import check_values
from vlp.config.tree import Config, ConfigError


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp, key: str, where: str):
    """Check/convert a parsed YAML value against a field type, or raise ConfigError."""
    origin = typing.get_origin(tp)

    def fail(expected: str):
        raise ConfigError(f"{where}: key '{key}' expects {expected}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, where)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in typing.get_args(tp):
            fail(_type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single shard pattern or number is a one-element list
        if not isinstance(value, list):
            fail(f"a list of {_type_name(item_tp)}")
        return [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any numeric spelling
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            fail("an integer" if tp is int else "a number")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            fail("a string")
        return str(value)
    fail(_type_name(tp))


def _build(cls, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{full}'{hint}; valid keys: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], full, where)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().startswith("#"):
        value = raw.strip()  # a colour such as #808080, not a YAML comment
    return key.strip().split("."), value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any) -> Any:
    """``${NAME}`` in a config file's strings replaced by the environment variable NAME (shard paths,
    dataset roots: ``data.train_shards: ["${LAION400M_SHARDS}"]``). An unset variable stays as written,
    so ``vlp train --dry-run`` can name it; a run stops on it (see ``unexpanded``)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def unexpanded(cfg: Config) -> list[tuple[str, str]]:
    """``(key, NAME)`` for every ``${NAME}`` left in ``cfg``'s strings (unset when it was loaded)."""
    found = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, str):
            found.extend((key, m.group(1)) for m in _VAR.finditer(value))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)

    walk(cfg.to_dict(), "")
    return found


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a Config from an optional YAML file and ``a.b=c`` overrides.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type, invalid value.
    """
    data: dict = {}
    where = "defaults"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = p.read_bytes().removeprefix(b"\xef\xbb\xbf")  # an editor's UTF-8 byte-order mark is harmless
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line, start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
            column = len(raw[start : e.start].decode("utf-8")) + 1  # the bytes before the bad one decode
            raise ConfigError(
                f"{p}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the file as UTF-8"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (model, data, train, ...)")
        data = expand_env(data)
        where = str(p)
    cfg = _build(Config, data, "", where)
    for item in overrides:
        keys, value = _parse_set(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        data = _merge(data, nested)
        cfg = _build(Config, data, "", f"--set {item}")
    try:
        return check_values(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from None


def config_from_dict(data: dict, where: str = "checkpoint") -> Config:
    """Rebuild a Config saved by :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return _build(Config, data, "", where)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
