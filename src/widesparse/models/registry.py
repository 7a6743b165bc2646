"""Registry of named models: ``register_model``, ``create_model``, ``list_models`` (after timm's registry).

Model files register builder functions with ``@register_model``; a preset is a builder that fixes some
keyword arguments. ``create_model`` drops ``None`` keyword arguments so that CLI defaults never override a
model's own defaults.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint", "model_defaults"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    _ensure_loaded()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_defaults(name: str) -> dict[str, Any]:
    """Keyword arguments a preset fixes (``create_model(name)`` uses them unless given)."""
    return dict(getattr(model_entrypoint(name), "preset", {}))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``None``-valued kwargs are dropped (model defaults apply)."""
    fn = model_entrypoint(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return fn(**kwargs)


def _ensure_loaded() -> None:
    # importing the model files runs their @register_model decorators
    import widesparse.models.mixer  # noqa: F401
    import widesparse.models.monarch_mlp  # noqa: F401
    import widesparse.models.sw_mlp  # noqa: F401
