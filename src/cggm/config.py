"""Run configuration: typed sections loaded from YAML presets and overridden from the command line.

A preset (``src/cggm/presets/<name>.yaml``) or a user file has four sections::

    dataset: {name: synthetic, options: {imbalance: 3.0}}     # options go to the dataset loader
    model:   {arch: mlp, options: {feature_dim: 32}}          # options go to the model builder
    method:  {name: cggm, options: {rho: 1.3, lam: 0.2}}      # options go to the method
    train:   {epochs: 20, batch_size: 64, lr: 0.001}          # fields of cggm.training.TrainConfig
    seed: 0

Overrides are ``section.key=value`` strings (values parsed as YAML), e.g.
``method.options.rho=1.2`` or ``train.epochs=5``.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from ._optional import require
from .training.trainer import TrainConfig

SECTIONS = ("dataset", "model", "method", "train", "seed", "output_dir", "description")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


def _yaml():
    return require("yaml", "cli", "Reading YAML configs")


def list_presets() -> list[str]:
    root = resources.files("cggm") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | None = None, method: str | None = None) -> dict[str, Any]:
    """A validated config dict from a preset name and/or a YAML file, then ``method`` (which
    replaces the configured method *and its options*, since one method's options mean nothing to
    another), then the overrides."""
    cfg: dict[str, Any] = default_config()
    if preset is not None:
        if preset not in list_presets():
            raise ConfigError(f"Unknown preset {preset!r}. Known presets: {', '.join(list_presets())}.")
        text = (resources.files("cggm") / "presets" / f"{preset}.yaml").read_text()
        cfg = merge(cfg, _parse(text, f"preset {preset!r}"))
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        cfg = merge(cfg, _parse(path.read_text(), str(path)))
    if method is not None and method != cfg.get("method", {}).get("name"):
        cfg["method"] = {"name": method, "options": {}}
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    validate(cfg)
    return cfg


def default_config() -> dict[str, Any]:
    return {"dataset": {"name": "synthetic", "options": {}}, "model": {"arch": "mlp", "options": {}},
            "method": {"name": "joint", "options": {}}, "train": {}, "seed": 0}


def _parse(text: str, where: str) -> dict[str, Any]:
    yaml = _yaml()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections {SECTIONS}, got {type(data).__name__}.")
    return data


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(cfg: dict[str, Any], item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"Override {item!r} must look like section.key=value (e.g. train.epochs=5).")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts or parts[0] not in SECTIONS:
        raise ConfigError(f"Override {item!r}: the first key must be one of {SECTIONS}.")
    try:
        value = _yaml().safe_load(raw) if raw.strip() else None
    except Exception as err:
        raise ConfigError(f"Override {item!r}: cannot parse the value {raw!r}: {err}") from err
    out = copy.deepcopy(cfg)
    node = out
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def validate(cfg: dict[str, Any]) -> None:
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown config sections {unknown}; allowed: {SECTIONS}.")
    for section, key in (("dataset", "name"), ("model", "arch"), ("method", "name")):
        sec = cfg.get(section)
        if not isinstance(sec, dict) or not isinstance(sec.get(key), str):
            raise ConfigError(f"Config section {section!r} needs a string {key!r}.")
        opts = sec.setdefault("options", {})
        if opts is None:
            sec["options"] = {}
        elif not isinstance(opts, dict):
            raise ConfigError(f"{section}.options must be a mapping, got {type(opts).__name__}.")
        extra = sorted(set(sec) - {key, "options"})
        if extra:
            raise ConfigError(f"Unknown keys {extra} in section {section!r}; put them under {section}.options.")
    train_config(cfg)  # raises on unknown or invalid train fields


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    train = dict(cfg.get("train") or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train) - known)
    if unknown:
        raise ConfigError(f"Unknown train settings {unknown}. Known: {sorted(known)}.")
    train.setdefault("seed", int(cfg.get("seed", 0)))
    try:
        return TrainConfig(**train)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
