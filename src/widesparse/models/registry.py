"""Registry of named models: ``register_model``, ``register_preset``, ``create_model``, ``list_models``.

After timm's registry: a model file registers builder functions (``@register_model``, or ``register_preset`` for a
model class with some keyword arguments fixed), and :mod:`widesparse.models` imports every model file so that the
registry is full once the package is imported. This module imports no model, so the imports point one way:
model files -> registry.

A preset has overridable defaults (``fn.preset``, what :func:`model_defaults` returns) and may have fixed
arguments the caller cannot give (``fixed``: e.g. the layer kind of ``kron_mlp``). ``create_model`` drops ``None``
keyword arguments so that CLI defaults never override a model's own defaults.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

__all__ = [
    "register_model", "register_preset", "create_model", "list_models", "model_entrypoint", "model_defaults",
    "model_kwargs", "check_kwargs",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its function name (a second registration of a name is an error)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def model_kwargs(cls: Callable[..., Any], exclude: Iterable[str] = ()) -> list[str]:
    """Sorted keyword arguments that ``cls(...)`` accepts (read with ``inspect.signature``), less ``exclude``."""
    skip = set(exclude)
    return sorted(n for n, p in inspect.signature(cls).parameters.items() if p.kind in _KINDS and n not in skip)


def check_kwargs(name: str, kwargs: Iterable[str], valid: Iterable[str]) -> None:
    """Raise ``TypeError`` naming model ``name``, the unknown keyword arguments and the valid ones."""
    valid = sorted(valid)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"model {name!r} got unknown keyword argument(s) {unknown}; valid: {valid}")


def register_preset(
    name: str,
    cls: Callable[..., nn.Module],
    preset: Mapping[str, Any] | None = None,
    doc: str = "",
    *,
    fixed: Mapping[str, Any] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[..., nn.Module]:
    """Register ``name``: a builder of ``cls(**{**preset, **kwargs, **fixed})``.

    ``preset``: defaults the caller may override (recorded as ``fn.preset``). ``fixed``: arguments the caller may
    not give (they are left out of the valid keyword arguments). Unknown keyword arguments raise ``TypeError``
    (:func:`check_kwargs`); ``check(kwargs)`` may reject further combinations. Returns the registered builder.
    """
    preset, fixed = dict(preset or {}), dict(fixed or {})
    valid = model_kwargs(cls, exclude=fixed)
    check_kwargs(name, preset, valid)  # a typo in a preset fails at import, not at the first build

    def fn(**kwargs: Any) -> nn.Module:
        check_kwargs(name, kwargs, valid)
        if check is not None:
            check(kwargs)
        return cls(**{**preset, **kwargs, **fixed})

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__module__ = getattr(cls, "__module__", __name__)
    fn.preset = preset  # type: ignore[attr-defined]
    return register_model(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_defaults(name: str) -> dict[str, Any]:
    """Keyword arguments a preset fixes by default (``create_model(name)`` uses them unless given)."""
    return dict(getattr(model_entrypoint(name), "preset", {}))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``None``-valued kwargs are dropped (model defaults apply)."""
    fn = model_entrypoint(name)
    return fn(**{k: v for k, v in kwargs.items() if v is not None})
