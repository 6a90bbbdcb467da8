"""Training methods as components: ``repa train --method NAME``.

Each method is one file here with a :class:`~repa_cache.train.methods.base.Method` subclass;
:data:`train.config.METHOD_REGISTRY` names them (torch-free) and :data:`METHODS` holds them. The
loop builds the student, reads the cache and computes the loss through the method and never
branches on its name.
"""

from __future__ import annotations

import importlib
from typing import Any

from repa_cache.cache.errors import UsageError, unknown_name
from repa_cache.train.config import METHOD_REGISTRY
from repa_cache.train.methods.base import Losses, Method, StepBatch

__all__ = ["METHODS", "Losses", "Method", "StepBatch", "make_method", "method_class", "method_from_card"]


def method_class(name: str) -> type[Method]:
    """The class of the method ``name`` (:data:`train.config.METHOD_REGISTRY`), imported now."""
    if name not in METHOD_REGISTRY:
        raise unknown_name("method", name, list(METHOD_REGISTRY))
    module, cls = METHOD_REGISTRY[name].split(":")
    found: type[Method] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    assert found.name == name, f"{METHOD_REGISTRY[name]} is the method '{found.name}', not '{name}'"
    return found


#: every method by name, in the registry's order
METHODS: dict[str, type[Method]] = {name: method_class(name) for name in METHOD_REGISTRY}


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method ``name`` with ``options`` (missing ones take the method's defaults)."""
    return method_class(name)(options)


def method_from_card(card_method: dict[str, Any]) -> Method:
    """Rebuild a method from the ``{"name", "options"}`` a run records (checkpoints, config.json)."""
    try:
        name, options = card_method["name"], card_method.get("options", {})
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"unreadable method record {card_method!r}") from None
    if not isinstance(options, dict):
        raise UsageError(f"unreadable options of method '{name}'")
    # Earlier runs recorded the encoder depth here too; it is the model's (card.model) and ignored.
    options = {k: v for k, v in options.items() if k != "encoder_depth"}
    return make_method(str(name), options)
