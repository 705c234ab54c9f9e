"""Config loading, overrides, and one-line errors naming the key, the file and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp.config import Config, ConfigError, config_from_dict, load_config
from vlp.config.docs import config_reference

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_overrides_convert_types():
    cfg = load_config(
        None, ["train.lr=3e-4", "data.batch_size=64", "data.train_shards=a/{0..3}.tar", "data.resampled=true"]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 64
    assert cfg.data.train_shards == ["a/{0..3}.tar"]
    assert cfg.data.resampled is True


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n  steps: 7\ndata:\n  batch_size: 8\n")
    cfg = load_config(f, ["train.steps=9"])
    assert (cfg.train.lr, cfg.train.steps, cfg.data.batch_size) == (1e-3, 9, 8)


@pytest.mark.parametrize(
    "yaml_text, pattern",
    [
        ("train:\n  lrr: 1\n", r"c\.yaml: unknown key 'train\.lrr' \(did you mean 'lr'\?\); valid keys: steps"),
        ("data:\n  batch_size: many\n", r"c\.yaml: key 'data\.batch_size' expects an integer, got 'many'"),
        (
            "train:\n  backend: mpi\n",
            r"key 'train\.backend' expects one of 'auto', 'single', 'ddp', 'deepspeed', 'fsdp', got 'mpi'",
        ),
        ("data:\n  batch_size: -4\n", r"c\.yaml: config key 'data\.batch_size' = -4 must be >= 1"),
        ("modle:\n  name: x\n", r"unknown key 'modle' \(did you mean 'model'\?\)"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("train: [1, 2\n", r"not valid YAML"),
        ("data:\n  train_weights: [1.0]\n", r"train_weights.*one weight per data\.train_shards"),
        ("loss:\n  contrastive:\n    impl: magic\n", r"'loss\.contrastive\.impl' expects one of 'gather', 'tiled'"),
        (
            "loss:\n  contrastive:\n    type: siglip\n    impl: tiled\n",
            r"'loss\.contrastive\.impl' = 'tiled' is not an impl of type siglip: gather, ring",
        ),
        ("loss:\n  contrastive:\n    dcl: true\n    label_smoothing: 0.1\n", r"cannot be combined"),
    ],
)
def test_errors_are_one_line_and_actionable(tmp_path, yaml_text, pattern):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(f)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_set():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"--set train\.steps=x: key 'train\.steps' expects an integer"):
        load_config(None, ["train.steps=x"])


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.lr=0.01", "eval.tasks=[retrieval]"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_every_shipped_config_loads():
    for f in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(f), Config)
        assert f.read_text().startswith("#"), f"{f.name} must open with a comment: the command and what it reaches"


def test_configuration_doc_is_generated_from_the_dataclasses():
    from vlp.config.docs import DOCS_INTRO

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert config_reference() in doc and DOCS_INTRO.strip() in doc, (
        "regenerate: python -m vlp.config.docs > docs/configuration.md"
    )


def test_config_file_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes("# r\u00e9sum\u00e9 of the run\ntrain:\n  steps: 7\n".encode("cp1252"))
    with pytest.raises(
        ConfigError, match=r"c\.yaml:1: not valid UTF-8 \(byte 0xe9 at column 4\); save the file as UTF-8"
    ):
        load_config(f)
    f.write_bytes("\ufeff# r\u00e9sum\u00e9\r\ntrain:\r\n  steps: 7\r\n".encode("utf-8"))  # a BOM and CRLF are fine
    assert load_config(f).train.steps == 7
