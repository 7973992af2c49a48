"""Typed config: YAML + overrides, loud errors with the key path, round trip."""

import json
import re
from pathlib import Path

import pytest

from app.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config, load_config

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
    from app.build import build_model

    cfg = load_config(path)
    model = build_model(cfg, 101, fresh=True)
    assert model.modality == cfg.model.modality and model.snippet_length == cfg.model.snippet_length


def test_rgb_needs_one_frame_snippets():
    with pytest.raises(ConfigError, match="model.snippet_length: must be 1 for modality rgb"):
        load_config(None, ["model.modality=rgb", "model.snippet_length=5"])


def test_default_yaml_is_the_embedded_default():
    path = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    assert load_config(path) == Config()


@pytest.mark.parametrize("override,message", [
    ("train.epochs=true", "train.epochs: expected an integer, got True"),  # a bool is not an int
    ("optim.lr=true", "optim.lr: expected a number, got True"),
    ("model.backbone=3", "model.backbone: expected a string, got 3"),
    ("augment.scales=1", "augment.scales: expected a list, got 1"),
    ("model.dropout=abc", "model.dropout: expected float | None, got 'abc'"),
    ("optim.first_conv_lr_mult=[1, x]", r"optim.first_conv_lr_mult: expected tuple\[float, ...\] \| None, got \[1, 'x'\]"),
    ("optim.first_conv_lr_mult=[1, 2, 3]", r"optim.first_conv_lr_mult: must be \[weight, bias\], got \[1.0, 2.0, 3.0\]"),
    ("optim.lr_steps=[30, 10]", r"optim.lr_steps: must be increasing epochs >= 1, got \[30, 10\]"),
    ("train.clip_grad_norm=0", r"train.clip_grad_norm: must be > 0 or null, got 0.0"),
    ("metrics.port=65536", r"metrics.port: must be in \[0, 65535\], got 65536"),
    ("model=null", "model: expected a mapping, got None"),
])
def test_type_and_value_messages(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(None, [override])


def test_unknown_key_lists_the_known_ones_and_the_first_error_written_wins():
    with pytest.raises(ConfigError, match=r"^model.num_segmnets: unknown key; known keys here: backbone, "
                                          r"modality, consensus, num_segments, snippet_length, "):
        load_config(None, ["model.num_segmnets=3"])
    with pytest.raises(ConfigError, match="^model.zz: unknown key"):
        config_from_dict({"model": {"zz": 1, "num_segments": "x"}})
    with pytest.raises(ConfigError, match="^model.num_segments: expected an integer"):
        config_from_dict({"model": {"num_segments": "x", "zz": 1}})
    with pytest.raises(ConfigError, match="^model.test_segments: expected an integer"):  # types before value rules
        config_from_dict({"model": {"num_segments": 0, "test_segments": "x"}})
    with pytest.raises(ConfigError, match="^model.num_segments: must be >= 1"):  # sections as written
        config_from_dict({"model": {"num_segments": 0}, "optim": {"lr": "x"}})
    with pytest.raises(ConfigError, match="^ckpt: model.True: unknown key"):  # YAML keys need not be strings
        config_from_dict({"model": {True: 1}}, source="ckpt")


def test_sections_are_typed_frozen_and_hashable():
    cfg = load_config(None, ["optim.lr=1", "augment.scales=[1, 0.5]", "optim.lr_steps=[3]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int is a valid float
    assert cfg.augment.scales == (1.0, 0.5) and all(isinstance(s, float) for s in cfg.augment.scales)
    assert cfg.optim.lr_steps == (3,)
    with pytest.raises((AttributeError, TypeError, ValueError)):
        cfg.optim.lr = 0.1
    assert hash(cfg) == hash(load_config(None, ["optim.lr=1.0", "augment.scales=[1.0, 0.5]", "optim.lr_steps=[3]"]))
    assert issubclass(ConfigError, ValueError)


def test_config_to_dict_is_plain_data():
    cfg = load_config(None, ["optim.lr_steps=[30, 60]", "optim.first_conv_lr_mult=[1, 2]"])
    d = config_to_dict(cfg)
    assert list(d) == list(Config.model_fields) and d["augment"]["scales"] == [1.0, 0.875, 0.75, 0.66]
    assert d["optim"]["lr_steps"] == [30, 60] and d["optim"]["first_conv_lr_mult"] == [1.0, 2.0]
    assert d["model"]["dropout"] == 0.5 and d["model"]["pretrained"] is None
    assert json.loads(json.dumps(d)) == d and config_from_dict(d) == cfg  # how checkpoints store it


def test_rgb_snippet_rule_comes_from_the_modality_table():
    from dataloading.modality import MODALITIES, get

    for name in MODALITIES:
        length = get(name).fixed_snippet_length or 3
        assert load_config(None, [f"model.modality={name}", f"model.snippet_length={length}"]).model.modality == name


def test_uses_embedded_dataset():
    assert Config().data.uses_embedded_dataset
    assert not load_config(None, ["data.shards=/data/ucf"]).data.uses_embedded_dataset


def test_shard_cache_keys():
    assert Config().data.cache_dir is None  # no cache unless asked for
    d = load_config(None, ["data.cache_dir=/mnt/nvme/tsn-cache", "data.cache_size_bytes=1000000"]).data
    assert d.cache_dir == "/mnt/nvme/tsn-cache" and d.cache_size_bytes == 1_000_000
    for override, message in [("data.cache_dir=s3://b/c", "data.cache_dir: must be a local directory or null, got s3://b/c"),
                              ("data.cache_size_bytes=0", "data.cache_size_bytes: must be >= 1, got 0"),
                              ("data.cache_size_bytes=1.5", "data.cache_size_bytes: expected an integer, got 1.5")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            load_config(None, [override])


def test_build_loaders_gets_the_cache_only_for_object_storage(tmp_path):
    from app.build import shard_cache

    assert shard_cache(load_config(None, ["data.shards=s3://b/p"])) is None  # no cache_dir: stream
    assert shard_cache(load_config(None, [f"data.cache_dir={tmp_path}/c"])) is None  # local shards: nothing to cache
    cache = shard_cache(load_config(None, ["data.shards=s3://b/p", f"data.cache_dir={tmp_path}/c",
                                           "data.cache_size_bytes=4096"]))
    assert cache.dir == tmp_path / "c" and cache.size_limit_bytes == 4096 and cache.dir.is_dir()
