"""Model registry in the style of timm: ``create_model(name, **kwargs)``.

Families live in ``edgediag.models.<family>`` and register themselves on import; the
registry imports them lazily (by name, not statically), so the engine and the stages can
build any model without depending on a model package."""

from __future__ import annotations

import importlib

from edgediag.config import from_dict, to_dict
from edgediag.engine.model import DiagnosisModel
from edgediag.errors import UserError

_REGISTRY: dict[str, type[DiagnosisModel]] = {}
_VARIANTS: dict[str, tuple[str, dict]] = {}  # variant name -> (family, config defaults)

# Families are imported by name when first needed (not statically: a model package imports the
# engine, never the other way), which also keeps `import edgediag.models` cheap.
_FAMILY_MODULES = ("tastgram_mfn", "aegan_ad", "memorymamba", "ldmamba", "image_cnn")


def register_model(name: str, variants: dict[str, dict] | None = None):
    """Class decorator: register a model family and optional named variants
    (e.g. ``memorymamba_nano`` = memorymamba with smaller config defaults)."""
    def deco(cls):
        cls.model_name = name
        _REGISTRY[name] = cls
        for variant, defaults in (variants or {}).items():
            _VARIANTS[variant] = (name, defaults)
        return cls
    return deco


def _load_families() -> None:
    for mod in _FAMILY_MODULES:
        try:
            importlib.import_module(f"edgediag.models.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgediag.models.{mod}":
                raise


def list_models() -> list[str]:
    _load_families()
    return sorted(set(_REGISTRY) | set(_VARIANTS))


def get_model_class(name: str) -> tuple[type[DiagnosisModel], dict]:
    """(model class, config defaults of the variant) for a registered name."""
    if name not in _REGISTRY and name not in _VARIANTS:
        _load_families()
    if name in _REGISTRY:
        return _REGISTRY[name], {}
    if name in _VARIANTS:
        family, defaults = _VARIANTS[name]
        return _REGISTRY[family], dict(defaults)
    raise UserError(f"unknown model {name!r} (available: {', '.join(list_models()) or 'none'})")


def build_config(name: str, config=None, **kwargs):
    """The model's config dataclass from a variant's defaults, a dict or dataclass, and kwargs."""
    cls, defaults = get_model_class(name)
    values = dict(defaults)
    if config is not None:
        values.update(to_dict(config) if not isinstance(config, dict) else config)
    values.update(kwargs)
    return from_dict(cls.Config, values, where=f"{name}.")


def instantiate(cls, config) -> DiagnosisModel:
    """``cls(config)``; a config the layers cannot be built from (a negative or zero width,
    heads that do not divide a dimension) is the user's input: one line, not a traceback."""
    try:
        return cls(config)
    except UserError:
        raise
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{getattr(cls, 'model_name', '') or cls.__name__}: the model cannot be built from its "
                        f"config ({first}); check the model.* values") from exc


def create_model(name: str, config=None, **kwargs) -> DiagnosisModel:
    """Build a registered model: ``create_model("ldmamba", n_classes=4)``."""
    cls, _ = get_model_class(name)
    return instantiate(cls, build_config(name, config, **kwargs))


__all__ = ["register_model", "create_model", "instantiate", "list_models", "get_model_class", "build_config"]
