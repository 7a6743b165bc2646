"""Static sparse-weight linear layers of the SW-MLP (docs/theory.md §4.2): ``y = (M ⊙ A) x + b``, fixed 0/1 mask ``M``.

Shapes: ``x`` ``(..., in_features)`` -> ``(..., out_features)``; the mask ``M`` is ``(out_features, in_features)``.

Two storages of the same layer:

* :class:`MaskedLinear`: a dense weight times a dense ``bool`` mask buffer, as every public implementation does it
  (fly's ``RandomLinear``, google-research/wide-sparse-nets). Memory and time grow with ``out * in``. At density 1 it
  is a plain dense layer and stores no mask.
* :class:`SparseLinear`: only the non-zero weights (``values``, the one weight ``Parameter``, so gradients and
  optimizer state are sized by the connections) and their CSR indices (int32 where they fit). The forward and
  backward passes are a custom autograd function on torch's CSR kernels (MKL on CPU, cuSPARSE on CUDA), chosen by
  measurement (benchmarks/bench_sparse.py): ``W @ x^T`` forward, ``W^T @ g^T`` for the input gradient with a
  transposed index structure kept alongside (never rebuilt per step), and ``torch.sparse.sampled_addmm`` (SDDMM)
  for the weight gradient.

Masks come from :mod:`widesparse.layers.masks` (seeded; the same seed gives the same mask in both layers):
``"bernoulli"`` or ``"fan_in"``. Init ``"golubeva"`` (default): N(0, 1/(in * p)), i.e. normalised by
the expected fan-in (Golubeva et al. 2021; ``1/k`` for fixed fan-in); ``"plain"``: N(0, 1/in). Biases start at zero.
The weights come from the global RNG, or from ``generator`` when one is given (mask and weights are separate draws).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from widesparse.layers.base import StructuredLinear
from widesparse.layers.masks import (
    INT32_MAX,
    InitRule,
    MaskKind,
    check_indices,
    check_layer_args,
    indices_to_mask,
    init_std,
    mask_indices,
    mask_row_counts,
    resolve_fan_in,
)
from widesparse.ops.matmul import linear_last

__all__ = ["MaskedLinear", "SparseLinear", "MaskKind", "InitRule", "mask_row_counts", "mask_indices",
           "indices_to_mask", "init_std"]


# ----------------------------------------------------------------------------------------------- kernels
def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch warns once per process that CSR support is "beta"
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _SparseLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` in CSR; backward by ``W^T`` (kept transposed structure) and SDDMM."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, layer: SparseLinear) -> Tensor:  # type: ignore[override]
        o, n = layer.out_features, layer.in_features
        x2 = x.reshape(-1, n)
        w = _csr(layer.crow_indices, layer.col_indices, values, (o, n))
        yt = torch.mm(w, x2.T) if bias is None else torch.addmm(bias.unsqueeze(1), w, x2.T)
        ctx.save_for_backward(x2, values)
        ctx.layer, ctx.x_shape, ctx.has_bias = layer, x.shape, bias is not None
        return yt.T.reshape(*x.shape[:-1], o)  # a view for 2-D inputs: (B, o) with strides (1, B)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x2, values = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        o, n = layer.out_features, layer.in_features
        g2t = grad_out.reshape(-1, o).T.contiguous()  # (o, B)
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            wt = _csr(layer.ccol_indices, layer.row_indices, values.index_select(0, layer.perm_t), (n, o))
            gx = torch.mm(wt, g2t).T.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            w = _csr(layer.crow_indices, layer.col_indices, values, (o, n))
            gv = torch.empty_like(values)  # SDDMM into our int32 structure (its own result would copy to int64)
            torch.sparse.sampled_addmm(w, g2t, x2, beta=0.0, out=_csr(layer.crow_indices, layer.col_indices, gv,
                                                                          (o, n)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2t.sum(1)
        return gx, gv, gb, None


# ------------------------------------------------------------------------------------------------ layers
class _MaskedBase(StructuredLinear):
    """Arguments shared by both storages (see :class:`MaskedLinear`); subclasses allocate in :meth:`_allocate`."""

    def __init__(
        self, in_features: int, out_features: int, density: float = 1.0, *, mask: MaskKind = "bernoulli",
        fan_in: int | None = None, init: InitRule = "golubeva", bias: bool = True, seed: int = 0,
        indices: tuple[Tensor, Tensor] | None = None, generator: torch.Generator | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_layer_args(in_features, out_features, density, mask, init)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.mask_kind, self.init_rule, self.seed = mask, init, int(seed)
        self.fan_in = resolve_fan_in(self.in_features, float(density), mask, fan_in)
        self.mask_density = float(density) if self.fan_in is None else self.fan_in / self.in_features
        o, n, fk = self.out_features, self.in_features, {"device": device, "dtype": dtype}
        if indices is not None:
            check_indices(*indices, o, n)
        elif torch.device(device or "cpu").type == "meta":  # count the connections, sample nothing
            indices = (None, int(mask_row_counts(o, n, self.mask_density, mask, seed, self.fan_in).sum()))
        elif not (isinstance(self, MaskedLinear) and self.mask_density == 1.0):
            indices = mask_indices(o, n, self.mask_density, mask, seed, self.fan_in)
        self._allocate(indices, fk)
        self.bias = nn.Parameter(torch.zeros(o, **fk)) if bias else None
        self.reset_parameters(generator)

    def _allocate(self, indices: tuple[Tensor | None, Tensor | int] | None, fk: dict) -> None:
        raise NotImplementedError

    def _init_std(self) -> float:
        return init_std(self.in_features, self.mask_density, self.init_rule, self.fan_in)

    def effective_bias(self, dtype: torch.dtype | None = None) -> Tensor | None:
        return None if self.bias is None else self.bias.detach().to(dtype or self.bias.dtype)

    def _layer_args(self) -> dict:
        return {"mask": self.mask_kind, "fan_in": self.fan_in, "init": self.init_rule, "bias": self.bias is not None,
                "seed": self.seed}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, density={self.mask_density:.4g}, "
            f"mask={self.mask_kind}, connections={self.connections}, bias={self.bias is not None}"
        )


class MaskedLinear(_MaskedBase):
    """``y = (W ⊙ M) x + b`` with a dense weight and a dense static ``bool`` mask (the peers' reference storage).

    Masked entries of ``weight`` are zero at init, receive exactly zero gradient and so stay zero under any
    optimizer whose update vanishes with the gradient (SGD, Adam, AdamW). ``density=1`` stores no mask.

    Args: ``density`` p in (0, 1]; ``mask`` ``"bernoulli"`` or ``"fan_in"`` (``fan_in``: explicit k); ``init``
    ``"golubeva"`` (std ``1/sqrt(in p)``) or ``"plain"`` (``1/sqrt(in)``); ``seed`` the mask seed; ``generator``
    the weights' (``None``: the global RNG; drawn in the mask's CSR order); ``indices`` an optional CSR
    ``(crow, col)`` replacing the sampled mask.
    """

    mask: Tensor | None

    def _allocate(self, indices: tuple[Tensor | None, Tensor | int] | None, fk: dict) -> None:
        o, n = self.out_features, self.in_features
        self.weight = nn.Parameter(torch.empty(o, n, **fk))
        if indices is None:  # density 1: a dense layer
            self.register_buffer("mask", None)
            self._nnz = o * n
        elif indices[0] is None:  # meta
            self.register_buffer("mask", torch.empty(o, n, dtype=torch.bool, device="meta"))
            self._nnz = indices[1]
        else:
            crow, col = indices
            self.register_buffer("mask", indices_to_mask(crow.cpu(), col.cpu(), o, n).to(fk["device"]))
            self._nnz = col.numel()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Weights N(0, std^2) on the mask (drawn in CSR order from ``generator`` or the global RNG), zeros
        elsewhere; bias 0."""
        with torch.no_grad():
            if self.weight.is_meta:
                return
            vals = torch.randn(self._nnz, dtype=self.weight.dtype, generator=generator) * self._init_std()
            if self.mask is None:
                self.weight.copy_(vals.view_as(self.weight))
            else:
                self.weight.zero_()
                self.weight[self.mask] = vals.to(self.weight.device)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        return linear_last(x, w, self.bias)  # float32 CPU: the oneDNN route of widesparse.ops.matmul

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        w = self.weight.detach().to(dtype or self.weight.dtype)
        return w.clone() if self.mask is None else w * self.mask

    @property
    def connections(self) -> int:
        if self.mask is None:
            return self.out_features * self.in_features
        return self._nnz if self.mask.is_meta else int(self.mask.count_nonzero())

    def to_sparse(self) -> SparseLinear:
        """The same layer (mask, weights, bias) stored as a :class:`SparseLinear`."""
        m = self.mask if self.mask is not None else torch.ones_like(self.weight, dtype=torch.bool)
        counts = m.sum(1)
        itype = torch.int32 if m.numel() <= INT32_MAX else torch.int64
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(itype)
        out = SparseLinear(self.in_features, self.out_features, self.mask_density, **self._layer_args(),
                           indices=(crow, m.nonzero()[:, 1].to(itype)), device=m.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.values.copy_(self.weight[m])
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class SparseLinear(_MaskedBase):
    """``y = W x + b`` storing only the connections of a static mask (values + CSR indices; docs/theory.md §4.2).

    ``values`` (length ``connections``, CSR order) is the only weight parameter. Buffers: ``crow_indices``,
    ``col_indices`` (persistent: the mask travels with the state dict) and the transposed structure
    ``ccol_indices``, ``row_indices``, ``perm_t`` (``values[perm_t]`` is ``W^T`` in CSR order), rebuilt after
    init and load. Loading a state dict with another mask (another seed) resizes the layer to it. Arguments as
    :class:`MaskedLinear`; the same ``seed`` gives the same mask and, under the same global RNG state, the same
    weights. Computes in the dtype of ``values`` (inputs are cast).
    """

    crow_indices: Tensor
    col_indices: Tensor
    ccol_indices: Tensor
    row_indices: Tensor
    perm_t: Tensor

    def _allocate(self, indices: tuple[Tensor | None, Tensor | int] | None, fk: dict) -> None:
        o, n = self.out_features, self.in_features
        crow, col = indices
        if crow is None:  # meta: shapes only
            itype = torch.int32 if max(col, o, n) <= INT32_MAX else torch.int64
            crow, col = torch.empty(o + 1, dtype=itype, device="meta"), torch.empty(col, dtype=itype, device="meta")
        self.register_buffer("crow_indices", crow.to(fk["device"]))
        self.register_buffer("col_indices", col.to(fk["device"]))
        self.values = nn.Parameter(torch.empty(col.numel(), **fk))
        for name in ("ccol_indices", "row_indices", "perm_t"):
            self.register_buffer(name, None, persistent=False)
        self.rebuild_transpose()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Values N(0, std^2) in CSR order from ``generator`` or the global RNG (as :class:`MaskedLinear`); bias 0."""
        with torch.no_grad():
            if self.values.is_meta:
                return
            vals = torch.randn(self.values.numel(), dtype=self.values.dtype, generator=generator)
            self.values.copy_(vals * self._init_std())
            if self.bias is not None:
                self.bias.zero_()

    def rebuild_transpose(self) -> None:
        """CSR structure of ``W^T`` and the permutation taking ``values`` to it (after init, load or a move)."""
        crow, col = self.crow_indices, self.col_indices
        if crow.is_meta:
            self.ccol_indices = torch.empty(self.in_features + 1, dtype=col.dtype, device="meta")
            self.row_indices, self.perm_t = torch.empty_like(col), torch.empty_like(col)
            return
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=crow.device, dtype=col.dtype),
                                       crow.long().diff())
        perm = torch.sort(col, stable=True).indices  # CSR order is row-major, so a stable sort by column is W^T's
        ccol = torch.zeros(self.in_features + 1, dtype=torch.int64, device=crow.device)
        torch.cumsum(torch.bincount(col.long(), minlength=self.in_features), 0, out=ccol[1:])
        self.ccol_indices = ccol.to(col.dtype)
        self.row_indices = rows.index_select(0, perm)
        self.perm_t = perm.to(col.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        return _SparseLinearFn.apply(x.to(self.values.dtype), self.values, self.bias, self)

    def weight_csr(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W`` as a torch sparse CSR tensor ``(out, in)`` (values detached, cast to ``dtype``)."""
        v = self.values.detach().to(dtype or self.values.dtype)
        return _csr(self.crow_indices, self.col_indices, v, (self.out_features, self.in_features))

    def weight_t_csr(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W^T`` as a sparse CSR tensor ``(in, out)`` from the kept transposed structure."""
        v = self.values.detach().index_select(0, self.perm_t).to(dtype or self.values.dtype)
        return _csr(self.ccol_indices, self.row_indices, v, (self.in_features, self.out_features))

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        v = self.values.detach().to(dtype or self.values.dtype)
        w = torch.zeros(self.out_features, self.in_features, dtype=v.dtype, device=v.device)
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=v.device), self.crow_indices.diff())
        w[rows, self.col_indices.long()] = v
        return w

    @property
    def connections(self) -> int:
        return self.col_indices.numel()

    def to_masked(self) -> MaskedLinear:
        """The same layer stored as a :class:`MaskedLinear` (dense weight and mask)."""
        out = MaskedLinear(self.in_features, self.out_features, self.mask_density, **self._layer_args(),
                           indices=(self.crow_indices.cpu(), self.col_indices.cpu()), device=self.values.device,
                           dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.effective_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # another mask (another seed) has another number of connections: resize to the incoming one first
        col, vals = state_dict.get(prefix + "col_indices"), state_dict.get(prefix + "values")
        if col is not None and vals is not None and col.shape == vals.shape and col.shape != self.col_indices.shape:
            self.col_indices = torch.empty(col.shape, dtype=col.dtype, device=self.col_indices.device)
            self.crow_indices = self.crow_indices.to(col.dtype)
            self.values.data = torch.empty(vals.shape, dtype=self.values.dtype, device=self.values.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.crow_indices.is_meta:
            try:
                check_indices(self.crow_indices, self.col_indices, self.out_features, self.in_features)
            except ValueError as e:
                error_msgs.append(f"{prefix}: loaded mask indices are invalid: {e}")
                return
        self.rebuild_transpose()
