"""Dataclass configs loadable from YAML with ``--set key=value`` overrides.

A run's YAML has one section per dataclass, e.g.::

    model: tastgram_mfn
    model_config: {embedding_dim: 128}
    train: {epochs: 20, lr: 1e-3}
    data: {root: ../shared/data/dcase2023_valve}

Unknown keys are errors (a typo must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from edgediag.errors import UserError


def from_dict(cls, values: dict | None, where: str = ""):
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(f'{where}{k}' for k in unknown)} (known: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _coerce(value, hints.get(key), f"{where}{key}")
    return cls(**values)


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists) that YAML, JSON and ``torch.load(weights_only=True)`` accept."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def replace(cfg, **changes):
    return from_dict(type(cfg), {**to_dict(cfg), **changes})


def _coerce(value, hint, key):
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
        origin = typing.get_origin(hint) if hint else None
        if hint is None:
            return value
    try:
        if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads --set data.root=2024 as a number
        if hint is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            inner = args[0] if args and args[-1] is not Ellipsis or len(args) == 2 else None
            items = [_coerce(v, inner, key) for v in value] if inner else list(value)
            return tuple(items) if origin is tuple else items
    except (TypeError, ValueError):
        raise UserError(f"config key {key}: cannot read {value!r} as {_type_name(hint)}") from None
    # What coercion could not turn into the declared type is refused here, not deep in a model
    # (a list where an int is expected used to end in a traceback).
    expected = {list: (list, tuple), tuple: (list, tuple), dict: dict}.get(origin) if origin else \
        {int: int, float: float, bool: bool, str: (str, bool)}.get(hint)  # bool for str: older YAML 1.1 "ON"
    if expected is not None and not isinstance(value, expected):
        raise UserError(f"config key {key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


class _OverrideLoader(yaml.SafeLoader):
    """YAML for --set values, with YAML 1.2's booleans: only true/false. YAML 1.1 also reads
    ON/OFF/yes/no as booleans, which turned `--set data.normal_labels=[ON]` into [True]."""


_OverrideLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                      list("tTfF"))


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars/lists)."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_OverrideLoader)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return tree


def load_tree(config_path: str | None, overrides: list[str], allowed_sections: set[str]) -> dict:
    """YAML file + overrides, with unknown top-level sections rejected."""
    tree = load_yaml(config_path) if config_path else {}
    tree = apply_overrides(tree, overrides)
    unknown = sorted(set(tree) - allowed_sections)
    if unknown:
        raise UserError(f"unknown config section {', '.join(unknown)} (known: {', '.join(sorted(allowed_sections))})")
    return tree
