"""Training methods as components: ``repa train --method NAME``.

Each method is one file here with a :class:`~repa_cache.train.methods.base.Method` subclass;
:data:`METHODS` lists them. The loop builds the student, reads the cache and computes the loss
through the method and never branches on its name.
"""

from __future__ import annotations

from typing import Any

from repa_cache.cache.errors import UsageError, unknown_name
from repa_cache.train.methods.base import Losses, Method, StepBatch
from repa_cache.train.methods.gmem import Gmem
from repa_cache.train.methods.haste import Haste
from repa_cache.train.methods.irepa import IRepa
from repa_cache.train.methods.reg import Reg
from repa_cache.train.methods.repa import Repa
from repa_cache.train.methods.urepa import URepa

METHODS: dict[str, type[Method]] = {m.name: m for m in (Repa, IRepa, Reg, URepa, Gmem, Haste)}

__all__ = ["METHODS", "Losses", "Method", "StepBatch", "make_method", "method_from_card"]


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method ``name`` with ``options`` (missing ones take the method's defaults)."""
    if name not in METHODS:
        raise unknown_name("method", name, list(METHODS))
    return METHODS[name](options)


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
