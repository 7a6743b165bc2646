"""Whole comparisons: two models over a loader (:func:`compare`), written to a folder (:func:`run_comparison`)."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from widesparse.cka.gram import F64
from widesparse.cka.minibatch import MinibatchCKA
from widesparse.cka.taps import features


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
    """Mean of ``M[i, i]`` for ``i < min(La, Lb)``: the paper's one-number summary (docs/theory.md §4.4)."""
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
    ``plot_fn=widesparse.analysis.plots.plot_cka`` (injected: this module imports nothing of the package), ``cka.png``.
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
