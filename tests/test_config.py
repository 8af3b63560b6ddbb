"""Config: defaults, YAML files and key=value overrides; unknown keys and wrong types name the key."""

from dataclasses import dataclass, field

import pytest

from streetvision.config import ConfigError, load_config, to_dict


@dataclass
class Model:
    lr: float = 1e-3
    backbone: str = "test_vit"


@dataclass
class Data:
    batch_size: int = 16


@dataclass
class Root:
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    seed: int = 0


def test_defaults_yaml_then_overrides_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  lr: 0.5\n  backbone: resnet18\ndata:\n  batch_size: 4\n")
    cfg = load_config(Root, [f], ["model.lr=0.001", "data.batch_size=32"])
    assert cfg.model.lr == 0.001 and cfg.model.backbone == "resnet18" and cfg.data.batch_size == 32
    assert isinstance(cfg, Root) and isinstance(cfg.model, Model)
    assert to_dict(cfg) == {
        "model": {"lr": 0.001, "backbone": "resnet18"},
        "data": {"batch_size": 32},
        "seed": 0,
    }


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="model.learning_rate"):
        load_config(Root, [], ["model.learning_rate=0.1"])


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataa:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match="dataa"):
        load_config(Root, [f])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(Root, [], ["data.batch_size=lots"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Root, [], ["model.lr"])


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Root, [tmp_path / "nope.yaml"])


def test_an_empty_override_is_the_empty_string_not_null():
    cfg = load_config(Root, [], ["model.backbone="])
    assert cfg.model.backbone == ""
