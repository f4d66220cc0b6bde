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

The whole configuration is checked before anything is built, written or trained
(:func:`check_config`, :class:`RunConfig`): the section names, the registered names, every option
against the signature (names and annotated types) of the dataset loader, model builder or method it
goes to, each method option's value (the method is built with it), every ``train`` setting
(:class:`~cggm.training.TrainConfig`) and the seed. Every problem is reported at once, one line
each, naming its field (``train.plateau_factor must be in (0, 1) ..., got 2``).
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import inspect
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

from ._optional import require
from .training.trainer import TrainConfig, TrainConfigError

SECTIONS = ("dataset", "model", "method", "train", "seed", "output_dir", "description")

log = logging.getLogger(__name__)  # unconfigured, Python prints its warnings as plain lines on stderr


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the problem.

    Made from a list of problems (one line each, naming the field), the message lists them all."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the configuration:\n"
                             + "\n".join(f"  {p}" for p in self.problems))


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
        if path.is_dir():
            hint = f" (did you mean {path / 'config.yaml'}?)" if (path / "config.yaml").is_file() else ""
            raise ConfigError(f"Config file {path} is a directory, not a YAML file{hint}.")
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
    """Raise a :class:`ConfigError` listing every problem of ``cfg`` (see :func:`check_config`)."""
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems)


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of ``cfg`` (its ``train`` section; the top-level ``seed`` unless
    ``train.seed`` is given)."""
    train = cfg.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"train must be a mapping of settings, got {type(train).__name__}.")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train) - known)
    if unknown:
        raise ConfigError([f"train.{k}: unknown setting (known: {', '.join(sorted(known))})" for k in unknown])
    train = dict(train)
    train.setdefault("seed", cfg.get("seed", 0))
    try:
        return TrainConfig(**train)
    except TrainConfigError as err:
        raise ConfigError([f"train.{msg}" for _, msg in err.problems]) from err


# -- the schema ------------------------------------------------------------------------------------
@dataclass
class Component:
    """A ``dataset``, ``model`` or ``method`` section: a registered name and the options it is built with."""

    name: str
    options: dict[str, Any]


@dataclass
class RunConfig:
    """A checked configuration. ``from_dict`` raises a :class:`ConfigError` listing every problem."""

    dataset: Component
    model: Component
    method: Component
    train: TrainConfig
    seed: int = 0
    description: str | None = None
    output_dir: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RunConfig:
        validate(cfg)
        return cls(dataset=Component(cfg["dataset"]["name"], dict(cfg["dataset"]["options"])),
                   model=Component(cfg["model"]["arch"], dict(cfg["model"]["options"])),
                   method=Component(cfg["method"]["name"], dict(cfg["method"]["options"])),
                   train=train_config(cfg), seed=int(cfg.get("seed", 0)), description=cfg.get("description"),
                   output_dir=cfg.get("output_dir"))


def check_config(cfg: dict[str, Any]) -> list[str]:
    """Every problem of ``cfg``, one line each, naming its field; ``[]`` when it can be used.

    Normalises ``cfg`` in place: a missing or null ``options`` becomes ``{}``, and an option
    annotated as a float that YAML read as a string (``1e-3``) becomes a float."""
    from .data.registry import DATASETS
    from .methods import METHODS
    from .models.factory import MODEL_BUILDERS

    if not isinstance(cfg, dict):
        return [f"the configuration must be a mapping of sections {', '.join(SECTIONS)}, got {type(cfg).__name__}"]
    out = [f"{k}: unknown section (sections: {', '.join(SECTIONS)})" for k in cfg if k not in SECTIONS]
    seed = cfg.get("seed", 0)
    seed_ok = isinstance(seed, int) and not isinstance(seed, bool)
    if not seed_ok:
        out.append(f"seed must be an integer, got {seed!r}")
    for key in ("description", "output_dir"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            out.append(f"{key} must be a string, got {cfg[key]!r}")
    for section, key, registry, kind in (("dataset", "name", DATASETS, "dataset"),
                                         ("model", "arch", MODEL_BUILDERS, "model architecture"),
                                         ("method", "name", METHODS, "method")):
        sec = cfg.get(section)
        if not isinstance(sec, dict):
            out.append(f"{section} must be a mapping with {key!r} and 'options', got {sec!r}")
            continue
        out += [f"{section}.{k}: unknown key (put options under {section}.options)" for k in sec
                if k not in (key, "options")]
        if sec.get("options") is None:
            sec["options"] = {}
        options = sec["options"]
        if not isinstance(options, dict):
            out.append(f"{section}.options must be a mapping, got {options!r}")
        name = sec.get(key)
        if not isinstance(name, str):
            out.append(f"{section}.{key} must be a string (see `cggm {section}s`), got {name!r}"
                       if section != "model" else f"model.arch must be a string, got {name!r}")
        elif name not in registry:
            out.append(f"{section}.{key}: unknown {kind} {name!r} (known: {', '.join(sorted(registry))})")
        elif isinstance(options, dict):
            out += option_problems(section, name, registry[name], options)
    train = cfg.get("train")
    if train is None:
        cfg["train"] = train = {}
    if not isinstance(train, dict):
        out.append(f"train must be a mapping of settings, got {train!r}")
    else:
        known = {f.name for f in fields(TrainConfig)}
        out += [f"train.{k}: unknown setting (known: {', '.join(sorted(known))})" for k in train if k not in known]
        given = {k: v for k, v in train.items() if k in known}
        if seed_ok:
            given.setdefault("seed", seed)
        try:
            TrainConfig(**given)
        except TrainConfigError as err:
            out += [f"train.{msg}" for _, msg in err.problems]
    return out


def option_problems(section: str, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> list[str]:
    """Problems of the ``options`` given to ``factory`` (a dataset loader, model builder or method
    factory registered as ``name``): names it does not take, values of another type than its
    annotation says, required arguments left out, and, for a method, values it refuses when built."""
    where = f"{section}.options"
    out, bad = [], set()
    if section == "method":
        takes, sets = factory_options(factory)
    else:
        params = _parameters(factory)
        takes = None if params is None else frozenset(params) - {"input_shapes", "task"}
        sets = frozenset()
    hints = _hints(factory)
    # a required argument left null is a placeholder (a preset's `path: null`): its loader says what to give
    placeholders = {n for n, p in (_parameters(factory) or {}).items() if p.default is inspect.Parameter.empty}
    for key, value in list(options.items()):
        bad.add(key)
        if takes is not None and key not in takes and key not in sets:  # (a variant's own setting can be overridden)
            out.append(f"{where}.{key}: not an option of {name} (options: {', '.join(sorted(takes)) or 'none'})")
        elif key in hints and not (value is None and key in placeholders) and not conforms(value, hints[key])[0]:
            out.append(f"{where}.{key} must be {describe(hints[key])}, got {value!r}")
        else:
            bad.discard(key)
            if key in hints and conforms(value, hints[key])[1] is not value:
                options[key] = conforms(value, hints[key])[1]
    if section == "model":  # widths of 0 (a model that sees no input)
        from .models.factory import size_problems
        out += [f"{where}.{msg}" for msg in size_problems({k: v for k, v in options.items() if k not in bad})]
    if section == "dataset":
        params = _parameters(factory) or {}
        out += [f"{where}.{p}: required by dataset {name!r}" + (" (give it with --data-path)" if p == "path" else "")
                for p, param in params.items() if param.default is inspect.Parameter.empty and p not in options]
    if section == "method":  # the values, judged by the method itself (those of a known name and type)
        out += _method_value_problems(name, factory, {k: v for k, v in options.items() if k not in bad})
    return out


def resolved_options(factory: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the defaults of the parameters ``factory`` takes and were not given, so
    that leaving an option out and giving its default value compare equal (a resumed run's
    settings); a factory whose signature cannot be read keeps ``options`` as they are."""
    if isinstance(factory, functools.partial):
        options = {**factory.keywords, **options}
        factory = factory.func
    target = factory.__init__ if isinstance(factory, type) else factory
    params = _parameters(target)
    if params is None:
        return dict(options)
    out = {n: p.default for n, p in params.items()
           if p.default is not inspect.Parameter.empty and n not in ("self", "input_shapes", "task")}
    out.update(options)
    return out


def _method_value_problems(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> list[str]:
    """Build the method with ``options`` (cheap: nothing is bound); a refusal is reported per
    option when the option alone is refused, else for the options together."""
    try:
        factory(**options)
        return []
    except (ValueError, TypeError, KeyError) as err:
        together = f"method.options: {name} refuses these options together: {err}"
    alone = []
    for key, value in options.items():
        try:
            factory(**{key: value})
        except (ValueError, TypeError, KeyError) as err:
            alone.append(f"method.options.{key}: {err}")
    return alone or [together]


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters of ``fn``; ``None`` if it takes any (``**kwargs``) or has no signature."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _hints(fn: Any) -> dict[str, Any]:
    """The annotated types of ``fn``'s parameters (through a ``partial``, a class's ``__init__``
    chain and a classmethod's class); an annotation that cannot be resolved is left out."""
    if isinstance(fn, functools.partial):
        return _hints(fn.func)
    if isinstance(fn, type):
        out: dict[str, Any] = {}
        for klass in reversed(fn.__mro__):
            init = klass.__dict__.get("__init__")
            if init is not None and klass is not object:
                out.update(_hints(init))
        return out
    owner = getattr(fn, "__self__", None)
    out = _hints(owner) if isinstance(owner, type) else {}
    target = getattr(fn, "__func__", fn)
    try:
        out.update({k: v for k, v in typing.get_type_hints(target).items() if k != "return"})
        return out
    except Exception:
        pass
    globalns = getattr(target, "__globals__", {})
    for key, ann in getattr(target, "__annotations__", {}).items():
        if key == "return":
            continue
        try:
            out[key] = eval(ann, globalns) if isinstance(ann, str) else ann  # noqa: S307 (the package's own code)
        except Exception:
            continue
    return out


def conforms(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether a YAML value fits the annotation ``hint``, and the value to use (a float given as
    the string YAML makes of ``1e-3`` becomes a float). Annotations it does not know accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True, value
    if hint is None or hint is type(None):
        return value is None, value
    if origin is Union or origin is types.UnionType:
        for arg in args:
            ok, coerced = conforms(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in args, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, value
    if hint is str:
        return isinstance(value, (str, os.PathLike)), value
    if isinstance(hint, type) and issubclass(hint, os.PathLike):
        return isinstance(value, (str, os.PathLike)), value
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False, value
            items = list(zip(value, args))
        else:
            items = [(v, args[0]) for v in value] if args else []
        results = [conforms(v, a) for v, a in items]
        if not all(ok for ok, _ in results):
            return False, value
        if any(c is not v for (ok, c), (v, _) in zip(results, items)):
            return True, type(value)(c for _, c in results) if args else value
        return True, value
    if container in (dict, Mapping, collections.abc.Mapping):
        return isinstance(value, dict), value
    return True, value  # a type YAML cannot make (the loader may convert): not judged here


def describe(hint: Any) -> str:
    """An annotation in words: ``int | None`` -> ``an integer or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is None or hint is type(None):
        return "null"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence):
        if container is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if container in (dict, Mapping, collections.abc.Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))
