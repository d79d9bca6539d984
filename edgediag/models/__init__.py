"""Model families, one package each (``edgediag.models.<family>``: the model, its config,
its scoring head, what it registers for the stages, and a README with the paper's numbers
and ours). The registry itself is :mod:`edgediag.engine.registry`; its names are
re-exported here so that ``edgediag.models.create_model(name, **kwargs)`` reads as in timm.
"""

from edgediag.engine.model import DiagnosisModel
from edgediag.engine.registry import (
    build_config,
    create_model,
    get_model_class,
    instantiate,
    list_models,
    register_model,
)

__all__ = ["DiagnosisModel", "register_model", "create_model", "instantiate", "list_models", "get_model_class",
           "build_config"]
