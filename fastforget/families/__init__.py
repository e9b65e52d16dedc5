"""Model families: what the method needs from each kind of model (families/base.py), one module
per family. The trainer, eval, demo and benchmarks use only this package's functions."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import InvalidValue
from ..weights import load_weights
from .base import Family, Recipe
from .mae import MAE
from .mage import MAGE
from .palette import Palette

FAMILIES: dict[str, Family] = {f.name: f for f in (MAE(), Palette(), MAGE())}


def get(name: str) -> Family:
    """The family called name."""
    if name not in FAMILIES:
        raise InvalidValue(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def of_model(name: str) -> Family:
    """The family of a model config name (mae_vit_tiny, palette_places2, ...)."""
    for family in FAMILIES.values():
        if name in family.configs:
            return family
    known = sorted(n for f in FAMILIES.values() for n in f.configs)
    raise InvalidValue(f"unknown model {name!r}; expected one of {known}")


def of(model: nn.Module) -> Family:
    """The family of a model: the one that made it (create, load), else the one of its class."""
    config = getattr(model, "fastforget_config", None)
    if config:
        return get(config["family"])
    for family in FAMILIES.values():
        if isinstance(model, family.model_type):
            return family
    raise InvalidValue(f"a {type(model).__name__} is not a model of a fastforget family ({sorted(FAMILIES)})")


def create(name: str, **overrides) -> nn.Module:
    """A model of the named config, of whichever family has it."""
    return of_model(name).create(name, **overrides)


def load(path: str, name: Optional[str] = None, **overrides) -> nn.Module:
    """A model from a checkpoint: fastforget's own (which record family and config) or a family's
    official files (which need name, or are told apart by their keys). Read once, weights only."""
    checkpoint = load_weights(path, "model file")
    config = (checkpoint.get("config") or {}) if isinstance(checkpoint, dict) else {}
    if name is not None:
        family = of_model(name)
    elif config.get("family"):
        family = get(config["family"])
    elif config.get("model"):
        family = of_model(config["model"])
    else:
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
        found = [f for f in FAMILIES.values() if isinstance(state, dict) and f.owns(state)]
        if not found:
            raise InvalidValue(f"{path} is not a model fastforget knows (none of {sorted(FAMILIES)}'s keys)")
        family = found[0]
    return family.load(path, name, checkpoint=checkpoint, **overrides)


__all__ = ["FAMILIES", "Family", "Recipe", "create", "get", "load", "of", "of_model"]
