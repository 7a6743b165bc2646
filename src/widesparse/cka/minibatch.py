"""The mini-batch CKA accumulator (docs/theory.md §4.4): all layer pairs of a minibatch from one product."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from widesparse.cka.gram import F64, _flat, gram_matrices, u_center


class MinibatchCKA:
    """Mini-batch CKA of all layer pairs of two networks (or one network with itself), docs/theory.md §4.4.

    Args:
        num_layers_a: layers of model A. num_layers_b: layers of model B; ``None`` compares A with itself
            (``update(feats_a)`` alone, one set of Grams per minibatch).
        names_a, names_b: layer names, used in error messages.
        gram_dtype: dtype of the Gram products (float64 default; float32 is the fast option). U-centring and
            the accumulators are float64 whatever this is.
        gram_blocks: row blocks of the symmetric Gram product (1 = plain ``X X^T``).
        center: subtract the minibatch feature mean before the Gram (no effect on the value, see
            :func:`gram_matrices`). device: where the accumulators live (default: that of the first update).
    """

    def __init__(
        self,
        num_layers_a: int,
        num_layers_b: int | None = None,
        *,
        names_a: Sequence[str] | None = None,
        names_b: Sequence[str] | None = None,
        gram_dtype: torch.dtype = F64,
        gram_blocks: int = 4,
        center: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if num_layers_a < 1 or (num_layers_b is not None and num_layers_b < 1):
            raise ValueError(f"need at least one layer per model, got {num_layers_a} and {num_layers_b}")
        if not gram_dtype.is_floating_point:
            raise ValueError(f"gram_dtype must be a floating dtype, got {gram_dtype}")
        self.num_layers_a, self.num_layers_b = num_layers_a, num_layers_b
        self.self_mode = num_layers_b is None
        self.names_a = _names(names_a, num_layers_a, "a")
        self.names_b = self.names_a if num_layers_b is None else _names(names_b, num_layers_b, "b")
        self.gram_dtype, self.gram_blocks, self.center = gram_dtype, gram_blocks, center
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every minibatch."""
        self.cross: Tensor | None = None
        self.self_a: Tensor | None = None
        self.self_b: Tensor | None = None
        self.num_batches = 0
        self.num_examples = 0
        self._buffers: dict[Any, Tensor] = {}

    def _check(self, feats: Sequence[Tensor], names: list[str], model: str) -> int:
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
            raise TypeError(f"model {model}: pass a list of per-layer feature tensors, got {type(feats).__name__}")
        if len(feats) != len(names):
            raise ValueError(f"model {model}: expected {len(names)} feature tensors, got {len(feats)}")
        sizes = [_flat(f, f"model {model} layer {names[i]!r}").shape[0] for i, f in enumerate(feats)]
        if any(s != sizes[0] for s in sizes):
            raise ValueError(f"model {model}: layers have different batch sizes {dict(zip(names, sizes, strict=True))}")
        if sizes[0] <= 3:
            raise ValueError(f"model {model}: batch size n={sizes[0]}; unbiased HSIC divides by n(n-3), need n >= 4")
        return sizes[0]

    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor] | None = None) -> None:
        """Add one minibatch: per-layer features ``(n, ...)`` of the same ``n`` examples for both models.

        The Grams of both models' layers are one stack; ``P = U U^T`` of the flattened U-centred Grams ``U``
        gives every cross term and both self terms at once.
        """
        if self.self_mode and feats_b is not None:
            raise ValueError("this MinibatchCKA compares model A with itself (num_layers_b=None); pass feats_a only")
        if not self.self_mode and feats_b is None:
            raise ValueError(f"model B has {self.num_layers_b} layers: pass feats_b too")
        n = self._check(feats_a, self.names_a, "A")
        feats = list(feats_a)
        if feats_b is not None:
            nb = self._check(feats_b, self.names_b, "B")
            if nb != n:
                raise ValueError(f"model A features have batch size {n}, model B {nb}: both must see the same examples")
            devs = {f.device for f in feats_a} | {f.device for f in feats_b}
            if len(devs) > 1:
                raise ValueError(f"features of models A and B are on several devices: {sorted(map(str, devs))}")
            feats += list(feats_b)
        la = self.num_layers_a
        g = gram_matrices(feats, self.gram_dtype, self.gram_blocks, self.center, self._buffers)
        u = u_center(g, inplace=True).flatten(1)
        prod = (u @ u.T).to(self.device or u.device)  # all pairs, both models, one matmul
        diag = prod.diagonal()
        bad = (~torch.isfinite(diag)).nonzero().flatten().tolist()
        if bad:  # a NaN/Inf feature poisons its layer's Gram and hence its self term
            names = [f"A:{self.names_a[i]}" if i < la else f"B:{self.names_b[i - la]}" for i in bad]
            hint = "" if g.dtype == F64 else f" (or {g.dtype} overflow: try gram_dtype=torch.float64)"
            raise ValueError(f"NaN or Inf features in layer(s) {names}{hint}")
        scale = 1.0 / (n * (n - 3))
        if self.cross is None:
            self.cross = torch.zeros(la, len(feats) - la if feats_b is not None else la, dtype=F64, device=prod.device)
            self.self_a = torch.zeros(la, dtype=F64, device=prod.device)
            self.self_b = self.self_a if self.self_mode else torch.zeros_like(self.cross[0])
        assert self.self_a is not None and self.self_b is not None
        if self.self_mode:
            self.cross.add_(prod, alpha=scale)
            self.self_a.add_(diag, alpha=scale)
        else:
            self.cross.add_(prod[:la, la:], alpha=scale)
            self.self_a.add_(diag[:la], alpha=scale)
            self.self_b.add_(diag[la:], alpha=scale)
        self.num_batches += 1
        self.num_examples += n

    def compute(self, all_reduce: bool = False, group: Any = None) -> Tensor:
        """The ``(La, Lb)`` CKA matrix (float64). ``all_reduce``: sum the accumulators over DDP ranks first."""
        if self.cross is None:
            raise RuntimeError("MinibatchCKA.compute() before any update()")
        cross, sa, sb = self.cross, self.self_a, self.self_b
        if all_reduce:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("compute(all_reduce=True) needs an initialised torch.distributed process group")
            flat = torch.cat([self.cross.flatten(), self.self_a, self.self_b])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            la, lb = self.cross.shape
            cross, sa, sb = flat[: la * lb].view(la, lb), flat[la * lb : la * lb + la], flat[la * lb + la :]
        assert sa is not None and sb is not None
        for s, names, model in ((sa, self.names_a, "A"), (sb, self.names_b, "B")):
            bad = (s <= 0).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"model {model}: HSIC(K,K) <= 0 in layer(s) {[names[i] for i in bad]} (constant?)")
        return cross / torch.sqrt(sa[:, None] * sb[None, :])


def _names(names: Sequence[str] | None, n: int, which: str) -> list[str]:
    if names is None:
        return [f"{which}{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names given for {n} layers of model {which.upper()}")
    return list(names)
