"""Fine-tuning recipes, one package each, registered by name.

A recipe is a config dataclass plus an ``apply`` function that rewrites a model in place. The
registry is the only place that maps a name to a recipe: the CLI builds its options from the
config fields, and the manifest stores the config as a plain dict.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import EdgetuneError
from ..models.arch import ArchSpec


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    # apply(model, config, arch, materialize) -> list of rewritten module paths. With
    # ``materialize=False`` the pass builds empty modules of the right shapes (for loading a
    # saved artifact on the meta device) instead of quantizing real weights.
    apply: Callable[[nn.Module, Any, ArchSpec, bool], list[str]]
    summary: str


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def _ensure_builtin() -> None:
    """Import every recipe package under ``edgetune.methods``; importing one registers it.

    Done lazily (on the first lookup) so ``import edgetune`` stays light, and by discovery so a
    new recipe is a new sub-package and nothing else.
    """
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise EdgetuneError(f"unknown recipe {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[Method]:
    _ensure_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def make_config(method: Method, options: dict[str, Any]):
    """Build a recipe's config from keyword options, naming any option the recipe lacks."""
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise EdgetuneError(
            f"recipe {method.name!r} has no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(fields))}"
        )
    try:
        config = method.config_cls(**options)
    except (TypeError, ValueError) as exc:
        raise EdgetuneError(f"bad {method.name} option: {exc}") from None
    return config


def config_from_dict(method: Method, data: dict[str, Any]):
    values = dict(data)
    for f in dataclasses.fields(method.config_cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return make_config(method, values)
