"""Linear CKA, full-batch and mini-batch (Kornblith et al. 2019; Nguyen, Raghu & Kornblith, ICLR 2021).

PAPER.md §4.4. For a minibatch of ``n`` examples with features ``X`` (flattened per example) the linear Gram
``K = X X^T`` is U-centred (``K^U``: zero diagonal, then the row/column means of the unbiased estimator
removed), and ``HSIC_1(K, L) = <K^U, L^U> / (n (n - 3))``. Mini-batch CKA sums the cross term and both self
terms over all minibatches and divides once::

    CKA_mb = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i))

All ``La x Lb`` layer pairs of one minibatch come from one matrix product of the flattened U-centred Grams
(the trick of Google's ``efficient_CKA.py``). The Grams of all layers of one width are one batched, symmetric
product (lower block triangle only); accumulators are always float64.

This module knows no model class: it takes tensors, any ``nn.Module`` plus module names (forward hooks), or a
model offering ``forward_intermediates(x, intermediates_only=True)`` and ``feature_names()``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "linear_cka",
    "gram_matrices",
    "u_center",
    "MinibatchCKA",
    "FeatureTap",
    "features",
    "CKAResult",
    "compare",
    "diagonal_mean",
    "run_comparison",
]

F64 = torch.float64


# ------------------------------------------------------------------------------------------------- kernels
def _flat(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: a 0-d tensor has no example dimension")
    if x.is_complex():
        raise TypeError(f"{what}: complex features are not supported")
    return x.reshape(x.shape[0], -1)


def gram_matrices(
    feats: Sequence[Tensor],
    dtype: torch.dtype = F64,
    blocks: int = 4,
    center: bool = True,
    buffers: dict[Any, Tensor] | None = None,
) -> Tensor:
    """Linear Grams ``K_l = X_l X_l^T`` of per-layer features ``(n, ...)``, as one ``(L, n, n)`` tensor in ``dtype``.

    Layers of equal width are stacked (into ``buffers``, reused across calls when given) and multiplied in one
    batched product of which only the lower block triangle is computed (``blocks`` row blocks:
    ``(blocks + 1) / (2 blocks)`` of the FLOPs) and mirrored. ``center`` subtracts each layer's minibatch mean
    first: ``K^U`` is unchanged (U-centring removes every ``a 1^T + 1 b^T`` term, which is all a feature shift
    adds) but float32 Grams lose no digits to large feature means.
    """
    xs = [_flat(x, f"layer {i}") for i, x in enumerate(feats)]
    if not xs:
        raise ValueError("gram_matrices: no feature tensors given")
    n, dev = xs[0].shape[0], xs[0].device
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.shape[1], []).append(i)
    out = None if len(groups) == 1 else torch.empty(len(xs), n, n, dtype=dtype, device=dev)
    for width, idx in groups.items():
        shape = (len(idx), n, width)
        key = (shape, dtype, dev)
        stack = None if buffers is None else buffers.get(key)
        if stack is None:
            stack = torch.empty(shape, dtype=dtype, device=dev)
            if buffers is not None:
                buffers[key] = stack
        torch.stack([xs[i] for i in idx], out=stack)
        if center:  # mean and rank-1 subtraction as batched BLAS calls (cheaper than elementwise kernels here)
            ones = stack.new_ones(len(idx), n, 1)
            stack.baddbmm_(ones, torch.bmm(ones.mT, stack).div_(n), alpha=-1.0)
        g = _sym_gram(stack, blocks)
        if out is None:
            return g
        out[idx] = g
    assert out is not None
    return out


def _sym_gram(s: Tensor, blocks: int) -> Tensor:
    """``s @ s^T`` for a stack ``(g, n, p)``: block column ``j`` is ``s[:, lo_j:] @ s[:, lo_j:hi_j]^T``, mirrored."""
    g, n, _ = s.shape
    b = max(1, min(int(blocks), n // 32))
    if b == 1:
        return torch.bmm(s, s.mT)
    edges = [round(k * n / b) for k in range(b + 1)]
    out = s.new_empty(g, n, n)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        col = torch.bmm(s[:, lo:], s[:, lo:hi].mT)  # rows lo.., columns lo..hi
        out[:, lo:, lo:hi] = col
        if hi < n:
            out[:, lo:hi, hi:] = col[:, hi - lo :].mT
    return out


def u_center(gram: Tensor, inplace: bool = False) -> Tensor:
    """U-centred Gram matrices ``(..., n, n)`` in float64 (PAPER.md §4.4; a copy unless ``inplace`` and the input
    is float64 already); needs ``n >= 4``. Row sums and the rank-2 correction are batched BLAS products."""
    n = gram.shape[-1]
    k = (
        gram
        if inplace and gram.dtype == F64 and gram.is_contiguous()
        else gram.to(F64, memory_format=torch.contiguous_format, copy=True)
    )
    k.diagonal(dim1=-2, dim2=-1).zero_()
    flat = k.view(-1, n, n)
    ones = k.new_ones(flat.shape[0], n, 1)
    r = torch.bmm(flat, ones).div_(n - 2)  # row sums of K~ / (n - 2)
    r -= r.sum(dim=1, keepdim=True) / (2 * (n - 1))
    flat.baddbmm_(torch.cat([r, ones], dim=2), torch.cat([ones, r], dim=2).mT, alpha=-1.0)  # K - r 1^T - 1 r^T
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def linear_cka(x: Tensor, y: Tensor, debiased: bool = False) -> float:
    """Full-batch linear CKA of ``(n, ...)`` features (Kornblith et al. 2019), in float64.

    ``debiased=False``: ``<HKH, HLH> / (||HKH|| ||HLH||)``; ``debiased=True``: the same with U-centred Grams,
    i.e. unbiased HSIC_1 in every term (PAPER.md §4.4).
    """
    a, b = _flat(x, "x").to(F64), _flat(y, "y").to(F64)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"linear_cka: x has {n} examples, y has {b.shape[0]}; rows must be the same examples")
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka: n={n} examples; need n >= {4 if debiased else 2} (debiased={debiased})")
    for name, t in (("x", a), ("y", b)):
        if not torch.isfinite(t).all():
            raise ValueError(f"linear_cka: {name} contains NaN or Inf")
    if debiased:
        k, l_ = u_center(a @ a.T), u_center(b @ b.T)
    else:
        a, b = a - a.mean(0), b - b.mean(0)
        k, l_ = a @ a.T, b @ b.T
    kk, ll = (k * k).sum(), (l_ * l_).sum()
    if kk <= 0 or ll <= 0:
        raise ValueError(f"linear_cka: constant features (HSIC(K,K)={float(kk):.3g}, HSIC(L,L)={float(ll):.3g})")
    return float((k * l_).sum() / torch.sqrt(kk * ll))


# -------------------------------------------------------------------------------------------- accumulator
class MinibatchCKA:
    """Mini-batch CKA of all layer pairs of two networks (or one network with itself), PAPER.md §4.4.

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


# ---------------------------------------------------------------------------------------------- features
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


# ----------------------------------------------------------------------------------------------- compare
@dataclass
class CKAResult:
    """A CKA matrix (rows: layers of model A, columns: model B) with its layer names and sample counts."""

    matrix: np.ndarray
    names_a: list[str]
    names_b: list[str]
    num_batches: int
    num_examples: int

    @property
    def diagonal_mean(self) -> float:
        return diagonal_mean(self.matrix)


def diagonal_mean(matrix: np.ndarray | Tensor) -> float:
    """Mean of ``M[i, i]`` for ``i < min(La, Lb)``: the paper's one-number summary (PAPER.md §4.4)."""
    m = np.asarray(matrix.detach().cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"diagonal_mean: need a non-empty 2-d matrix, got shape {m.shape}")
    return float(np.mean(np.diagonal(m)))


def compare(
    model_a: nn.Module,
    model_b: nn.Module | None,
    loader: Iterable[Any],
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    passes: int = 10,
    gram_dtype: torch.dtype = F64,
    gram_blocks: int = 4,
    device: torch.device | str | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    progress: bool = True,
) -> CKAResult:
    """Mini-batch CKA between the layers of two models over ``passes`` passes of ``loader`` (Nguyen et al.).

    Both models run in eval mode under ``no_grad`` on the same inputs (every module's mode is restored
    afterwards). ``model_b=None`` (or ``model_a`` itself with the same layers) compares a model with itself, one
    forward pass per batch. Batches are tensors or tuples whose first item is the input (else give
    ``input_fn``); inputs are moved to ``device``, models are not. A shuffling DataLoader reshuffles each pass.
    """
    from tqdm.auto import tqdm

    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if model_b is model_a and (layers_b is None or list(layers_b) == list(layers_a or [])):
        model_b = None
    get = input_fn or (lambda batch: batch[0] if isinstance(batch, tuple | list) else batch)
    modes = [(m, m.training) for model in (model_a, model_b) if model is not None for m in model.modules()]
    try:
        with ExitStack() as stack:
            taps = [
                stack.enter_context(features(m.eval(), ls))
                for m, ls in ((model_a, layers_a), (model_b, layers_b))
                if m is not None
            ]
            names_b = taps[-1].names
            acc = MinibatchCKA(
                len(taps[0].names),
                None if model_b is None else len(names_b),
                names_a=taps[0].names,
                names_b=names_b,
                gram_dtype=gram_dtype,
                gram_blocks=gram_blocks,
            )
            total = passes * len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
            with tqdm(total=total, desc="CKA", unit="batch", disable=not progress) as bar:
                for _ in range(passes):
                    for batch in loader:
                        x = get(batch)
                        if device is not None:
                            x = x.to(device) if isinstance(x, Tensor) else {k: v.to(device) for k, v in x.items()}
                        acc.update(*[tap(x) for tap in taps])
                        bar.update(1)
    finally:
        for m, mode in modes:
            m.training = mode
    if acc.num_batches == 0:
        raise ValueError("compare: the loader yielded no batches")
    m = acc.compute().cpu().numpy()
    return CKAResult(m, list(taps[0].names), list(names_b), acc.num_batches, acc.num_examples)


class _Shuffled:
    """Batches of a tensor in a fresh seeded permutation on every iteration; a tail of < 4 joins the last batch."""

    def __init__(self, x: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.batch_size, self.gen = x, batch_size, torch.Generator().manual_seed(seed)
        self.num = max(1, len(x) // batch_size) if len(x) % batch_size < 4 else -(-len(x) // batch_size)

    def __len__(self) -> int:
        return self.num

    def __iter__(self) -> Iterator[Tensor]:
        perm = torch.randperm(len(self.x), generator=self.gen)
        for b in range(self.num):
            stop = len(perm) if b == self.num - 1 else (b + 1) * self.batch_size
            yield self.x[perm[b * self.batch_size : stop]]


def run_comparison(
    model_a: nn.Module,
    model_b: nn.Module | None,
    x: Tensor,
    out_dir: str | Path,
    *,
    names_a: Sequence[str] | None = None,
    names_b: Sequence[str] | None = None,
    label_a: str = "model A",
    label_b: str = "model B",
    batch_size: int = 256,
    passes: int = 10,
    seed: int = 0,
    gram_dtype: torch.dtype = F64,
    device: torch.device | str | None = None,
    progress: bool = True,
    plot_fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """:func:`compare` on inputs ``x`` (seeded, reshuffled batches; ``passes`` passes), written to ``out_dir``.

    Writes ``cka.npy``, ``cka.csv`` (long format: i, j, layer_a, layer_b, cka) and, with
    ``plot_fn=widesparse.plots.plot_cka`` (injected: this module imports nothing of the package), ``cka.png``.
    ``model_b=None`` compares ``model_a`` with itself. Returns a summary dict with ``diag_mean``.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("run_comparison: x must be a tensor of inputs (N, ...)")
    if batch_size < 4 or len(x) < 4:
        raise ValueError(f"run_comparison: need batch_size >= 4 and >= 4 examples, got {batch_size} and {len(x)}")
    t0 = time.perf_counter()
    kw = {"passes": passes, "gram_dtype": gram_dtype, "device": device, "progress": progress}
    res = compare(model_a, model_b, _Shuffled(x, batch_size, seed), layers_a=names_a, layers_b=names_b, **kw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "cka.npy", res.matrix)
    with open(out / "cka.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["i", "j", "layer_a", "layer_b", "cka"])
        for i, na in enumerate(res.names_a):
            for j, nb in enumerate(res.names_b):
                w.writerow([i, j, na, nb, repr(float(res.matrix[i, j]))])
    files = [out / "cka.npy", out / "cka.csv"]
    if plot_fn is not None:
        files.append(out / "cka.png")
        plot_fn(
            res.matrix, res.names_a, res.names_b, files[-1], label_a=label_a, label_b=label_b if model_b else label_a
        )
    return {
        "diag_mean": res.diagonal_mean,
        "names_a": res.names_a,
        "names_b": res.names_b,
        "num_batches": res.num_batches,
        "num_examples": res.num_examples,
        "seconds": time.perf_counter() - t0,
        "files": [str(f) for f in files],
    }
