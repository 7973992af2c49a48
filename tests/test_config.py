"""Typed config: YAML + overrides, loud errors with the key path, round trip."""

from pathlib import Path

import pytest

from app.config import Config, ConfigError, dump_config, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=0.01", "model.num_segments=5", "augment.scales=[1, 0.875]",
                             "model.dropout=null", "data.shards=/x/y"])
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.model.num_segments == 5
    assert cfg.augment.scales == (1.0, 0.875)
    assert cfg.model.dropout is None
    assert cfg.data.shards == "/x/y"
    assert load_config(None) == Config()


@pytest.mark.parametrize("override,message", [
    ("model.num_segmnets=3", "model.num_segmnets: unknown key"),
    ("optim.lr=abc", "optim.lr: expected a number"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("model.partial_bn=1", "model.partial_bn: expected true/false"),
    ("loader.device=tpu", "loader.device: must be one of cpu, gpu"),
    ("model.modality=depth", "model.modality: must be one of"),
    ("model.num_segments=0", "model.num_segments: must be >= 1"),
    ("augment.scales=[1, x]", r"augment.scales\[1\]: expected a number"),
    ("bogus=1", "bogus: unknown key"),
    ("optim=3", "optim: expected a mapping"),
    ("optim.lr.x=3", "optim.lr: expected a number"),
    ("optim.lr", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\n  num_segments: three\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.num_segments: expected an integer"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr_steps=[30, 60]", "model.modality=rgb_diff", "model.snippet_length=5"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    """Every shipped config loads and builds its model (cross-field errors show up here)."""
    from app.worker import build_model

    cfg = load_config(path)
    model = build_model(cfg, 101, fresh=True)
    assert model.modality == cfg.model.modality and model.snippet_length == cfg.model.snippet_length


def test_rgb_needs_one_frame_snippets():
    with pytest.raises(ConfigError, match="model.snippet_length: must be 1 for modality rgb"):
        load_config(None, ["model.modality=rgb", "model.snippet_length=5"])


def test_default_yaml_is_the_embedded_default():
    path = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    assert load_config(path) == Config()
