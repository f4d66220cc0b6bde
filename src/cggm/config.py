"""Run configuration: typed sections loaded from YAML presets and overridden from the command line.

A preset (``src/cggm/presets/<name>.yaml``) or a user file has four sections::

    dataset: {name: synthetic, options: {imbalance: 3.0}}     # options go to the dataset loader
    model:   {arch: mlp, options: {feature_dim: 32}}          # options go to the model builder
    method:  {name: cggm, options: {rho: 1.3, lam: 0.2}}      # options go to the method
    train:   {epochs: 20, batch_size: 64, lr: 0.001}          # fields of cggm.training.TrainConfig
    seed: 0

Overrides are ``section.key=value`` strings (values parsed as YAML), e.g.
``method.options.rho=1.2`` or ``train.epochs=5``.

Replacing the method (``load_config(method=...)``, ``cggm train --method``) keeps the configured
options that the new method takes, and says on stderr (the ``cggm.config`` logger) what was
replaced, kept and dropped: see :func:`carry_method_options`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from ._optional import require
from .training.trainer import TrainConfig

SECTIONS = ("dataset", "model", "method", "train", "seed", "output_dir", "description")

log = logging.getLogger(__name__)  # unconfigured, Python prints its warnings as plain lines on stderr


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


def _yaml():
    return require("yaml", "cli", "Reading YAML configs")


def list_presets() -> list[str]:
    root = resources.files("cggm") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | None = None, method: str | None = None) -> dict[str, Any]:
    """A validated config dict from a preset name and/or a YAML file, then ``method``, then the overrides.

    ``method`` replaces the configured method; of the configured options, those the new method
    takes are kept and the others dropped (:func:`carry_method_options`), and one line on the
    ``cggm.config`` logger (stderr, unless logging is configured otherwise) says which."""
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
    if method is not None:
        cfg, note = replace_method(cfg, method)
        if note:
            log.warning(note)
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    validate(cfg)
    return cfg


def replace_method(cfg: dict[str, Any], name: str) -> tuple[dict[str, Any], str | None]:
    """``cfg`` with method ``name`` in place of the configured one, and a one-line note of what was
    replaced, kept and dropped (``None`` when nothing changed or no option was configured).
    The configured options that ``name`` takes are kept; see :func:`carry_method_options`."""
    section = cfg.get("method")
    old = section.get("name") if isinstance(section, dict) else None
    if old == name:
        return cfg, None
    options = section.get("options") if isinstance(section, dict) else None
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"method.options must be a mapping, got {type(options).__name__}.")
    kept, dropped = carry_method_options(str(old), options or {}, name)
    out = copy.deepcopy(cfg)
    out["method"] = {"name": name, "options": kept}
    note = describe_method_change(str(old), name, options, dropped) if options else None
    return out, note


def carry_method_options(old: str, options: Mapping[str, Any], new: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Which options of method ``old`` method ``new`` runs with: ``(kept, {dropped: why})``.

    An option is kept when ``new`` takes it (its registered factory's signature, resolved through
    ``functools.partial`` and a classmethod that forwards ``**kwargs`` to its class) and ``new`` is
    a variant of the same method (e.g. ``cggm`` -> ``cggm_official``: the same class). It is
    dropped when ``new`` does not take it, when ``new`` sets it itself (the keywords of a
    ``partial`` such as ``cggm_magnitude``'s ``lam=0``, or what a classmethod such as
    ``CGGM.official`` passes to its class: the variant is defined by them), or when ``new`` is
    another method, whose option of the same name may mean something else (``lam`` of ``cggm`` is
    not ``lam`` of ``umt``)."""
    from .methods import METHODS

    if new not in METHODS:
        raise ConfigError(f"Unknown method {new!r}. Known methods: {', '.join(sorted(METHODS))}.")
    takes, sets = factory_options(METHODS[new])
    related = same_method(old, new)
    kept, dropped = {}, {}
    for key, value in options.items():
        if key in sets:
            dropped[key] = f"{new} sets it itself"
        elif takes is not None and key not in takes:
            dropped[key] = f"not an option of {new}"
        elif not related:
            dropped[key] = f"{new} is not a variant of {old}"
        else:
            kept[key] = copy.deepcopy(value)
    return kept, dropped


def describe_method_change(old: str, new: str, options: Mapping[str, Any], dropped: Mapping[str, str]) -> str:
    """One line: ``method A replaced by B: kept its options k=v, ...; dropped k=v (why), ...``."""
    kept = [f"{k}={v}" for k, v in options.items() if k not in dropped]
    text = f"method {old} replaced by {new}: " + (f"kept its options {', '.join(kept)}" if kept
                                                  else "kept none of its options")
    if dropped:
        text += ("; dropped " + ", ".join(f"{k}={options[k]} ({why})" for k, why in dropped.items())
                 + f"; set an option of {new} with method.options.KEY=VALUE")
    return text


def factory_options(factory: Callable[..., Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """``(takes, sets)`` of a method factory: the keyword options it takes (``None`` if it takes any:
    a ``**kwargs`` that cannot be resolved), and those it sets itself, which define it as a variant
    (the keywords of a ``partial``; what a classmethod passes to its class beyond the class's
    defaults). ``sets`` is not part of ``takes``."""
    if isinstance(factory, functools.partial):
        takes, sets = factory_options(factory.func)
        bound = set(factory.keywords) | set(_positional_names(factory.func)[:len(factory.args)])
        sets = sets | set(factory.keywords)
        return (None if takes is None else frozenset(takes - bound - sets)), frozenset(sets)
    if isinstance(factory, type):
        return _class_options(factory), frozenset()
    owner = getattr(factory, "__self__", None)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None, frozenset()
    own = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(own), frozenset()
    if not isinstance(owner, type):  # a function taking **kwargs: it may take anything
        return None, frozenset()
    # a classmethod forwarding **kwargs to its class (e.g. CGGM.official)
    class_takes = _class_options(owner)
    sets = frozenset(_classmethod_sets(factory, owner) - own)
    takes = None if class_takes is None else frozenset((own | class_takes) - sets)
    return takes, sets


def method_class(factory: Callable[..., Any]) -> type | None:
    """The class a method factory builds: the class itself, a ``partial``'s, or a classmethod's."""
    if isinstance(factory, functools.partial):
        return method_class(factory.func)
    if isinstance(factory, type):
        return factory
    owner = getattr(factory, "__self__", None)
    return owner if isinstance(owner, type) else None


def same_method(a: str, b: str) -> bool:
    """Whether registered methods ``a`` and ``b`` are variants of one method: they build the same
    class (``cggm``, ``cggm_official``), or one a subclass of the other (``ogm`` of ``ogm_ge``);
    not two methods that merely share the :class:`~cggm.methods.Method` base (``joint``). A
    method whose class cannot be told (an unregistered name, a plain function) counts as related,
    so that its options are judged by name alone."""
    from .methods import METHODS
    from .methods.base import Method

    ca = method_class(METHODS[a]) if a in METHODS else None
    cb = method_class(METHODS[b]) if b in METHODS else None
    if ca is None or cb is None or ca is cb:
        return True
    return Method not in (ca, cb) and (issubclass(ca, cb) or issubclass(cb, ca))


def _positional_names(fn: Callable[..., Any]) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _class_options(cls: type) -> frozenset[str] | None:
    """Keyword options of ``cls(...)``, following ``**kwargs`` up the ``__init__`` chain."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return frozenset(names)
        try:
            params = list(inspect.signature(init).parameters.values())[1:]  # without self
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return frozenset(names)
    return frozenset(names)


def _classmethod_sets(factory: Callable[..., Any], owner: type) -> set[str]:
    """The options a classmethod passes to its class with values other than the class's defaults,
    found by calling it with a stand-in that records the call (nothing is built)."""
    func = getattr(factory, "__func__", None)
    calls: list[dict[str, Any]] = []
    if func is None:
        return set()
    try:
        func(lambda *args, **kwargs: calls.append(kwargs))
    except Exception:  # it does more than forward: nothing can be said about it
        return set()
    if len(calls) != 1:
        return set()
    try:
        defaults = {name: p.default for name, p in inspect.signature(owner).parameters.items()}
    except (TypeError, ValueError):
        return set()
    out = set()
    for key, value in calls[0].items():
        default = defaults.get(key, inspect.Parameter.empty)
        try:
            same = default is not inspect.Parameter.empty and bool(default == value)
        except Exception:
            same = False
        if not same:
            out.add(key)
    return out


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
