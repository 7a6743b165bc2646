"""Feature taps: a model's layer outputs captured by forward hooks or ``forward_intermediates``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class FeatureTap:
    """Callable returned by :func:`features`: ``tap(x)`` runs the model under ``no_grad`` and returns the
    detached features of :attr:`names`, in that order. A captured output that a later in-place op changes
    (``ReLU(inplace=True)``) is detected by its version counter; that layer is then copied at capture and the
    forward pass rerun, so the features are what the module returned."""

    def __init__(self, model: nn.Module, names: list[str], indices: list[int] | None) -> None:
        self.model, self.names, self._indices = model, names, indices
        self._store: dict[str, list[tuple[Tensor, int]]] = {name: [] for name in names}
        self._clone: set[str] = set()
        self.handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, tuple | list):
                out = next((o for o in out if isinstance(o, Tensor)), out)
            if not isinstance(out, Tensor):
                raise TypeError(f"module {name!r} returned {type(out).__name__}, not a Tensor")
            t = out.detach().clone() if name in self._clone else out.detach()
            self._store[name].append((t, t._version))

        return hook

    def __call__(self, x: Any) -> list[Tensor]:
        with torch.no_grad():
            if self._indices is not None:
                feats = self.model.forward_intermediates(x, intermediates_only=True)  # type: ignore[operator]
                return [feats[i].detach() for i in self._indices]
            for _ in range(2):
                for v in self._store.values():
                    v.clear()
                self.model(**x) if isinstance(x, dict) else self.model(x)
                for name, got in self._store.items():
                    if len(got) != 1:
                        raise RuntimeError(f"module {name!r} ran {len(got)} times in one forward pass; need once")
                changed = {name for name, ((t, ver),) in self._store.items() if t._version != ver}
                if not changed:
                    return [got[0][0] for got in self._store.values()]
                self._clone |= changed
            raise RuntimeError(f"outputs of {sorted(changed)} change in place even when copied at capture")


@contextmanager
def features(model: nn.Module, layers: Sequence[str] | None = None) -> Iterator[FeatureTap]:
    """Context manager yielding a :class:`FeatureTap` over ``model``'s features (no gradients kept).

    ``layers=None`` (or names from ``model.feature_names()``) uses ``model.forward_intermediates(x,
    intermediates_only=True)``; other names are modules of ``model.named_modules()`` captured by forward hooks
    (any ``nn.Module``). Every hook is removed on exit, also when the body raises.
    """
    has_fi = callable(getattr(model, "forward_intermediates", None)) and callable(getattr(model, "feature_names", None))
    fnames = list(model.feature_names()) if has_fi else []  # type: ignore[operator]
    if layers is None:
        if not has_fi:
            raise ValueError(
                f"{type(model).__name__} has no forward_intermediates()/feature_names(); pass layers=[module names], "
                f"e.g. {[n for n, _ in model.named_modules() if n][:8]}"
            )
        layers = fnames
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("features: empty layer list")
    if len(set(layers)) != len(layers):
        raise ValueError(f"features: duplicate layer names in {layers}")
    if has_fi and all(name in fnames for name in layers):
        yield FeatureTap(model, layers, [fnames.index(name) for name in layers])
        return
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        valid = [n for n in modules if n]
        extra = f"; or feature names {fnames}" if fnames else ""
        raise ValueError(f"unknown layer name(s) {unknown} for {type(model).__name__}; valid modules: {valid}{extra}")
    tap = FeatureTap(model, layers, None)
    try:
        for name in layers:
            tap.handles.append(modules[name].register_forward_hook(tap._hook(name)))
        yield tap
    finally:
        for h in tap.handles:
            h.remove()
        tap.handles.clear()
