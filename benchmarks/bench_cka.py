"""Mini-batch CKA, widesparse against torch-cka and ckatorch, side by side on the same features.

Workload (default): 8 x 8 layer pairs, 40 minibatches of 256 examples, 4,096 features per layer, CPU with 2
threads. Each model is a "replay" network whose 8 submodules return precomputed feature slabs (views, so the
forward pass costs nothing and is identical for everyone); every implementation captures them with its own
forward hooks, exactly as a user would. Per round, every implementation runs once, interleaved, so machine load
hits all of them alike; we report medians and per-round ratios. The values are checked against a float64
reference written here from the HSIC_1 formula (docs/theory.md §4.4), independent of widesparse.cka.

    python benchmarks/bench_cka.py            # full workload: 1.5 min on 2 quiet cores, 8-13 min on busy ones
    python benchmarks/bench_cka.py --quick    # 8 minibatches, 1 round, no ckatorch (--ckatorch subset adds it)

Peers (the ``bench`` extra): ``torch-cka==0.21`` and ``ckatorch==1.0.3`` installed with ``--no-deps``, plus
ckatorch's imports ``pyyaml``, ``safetensors``, ``seaborn``. Writes benchmarks/results/cka.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from widesparse.cka import MinibatchCKA, compare, features, gram_matrices, u_center

F64 = torch.float64


# ------------------------------------------------------------------------------------------ workload
def make_banks(batches: int, layers: int, n: int, p: int, seed: int) -> tuple[Tensor, Tensor]:
    """Features ``(batches, layers, n, p)`` float32 for models A and B: a shared 64-dim signal mixed by
    slowly drifting per-layer maps, plus noise and a per-feature offset (as post-activation features have)."""
    g = torch.Generator().manual_seed(seed)
    r = 64
    banks = []
    maps_a = [torch.randn(r, p, generator=g)]
    for _ in range(layers - 1):
        maps_a.append(0.8 * maps_a[-1] + 0.6 * torch.randn(r, p, generator=g))
    maps_b = [0.7 * m + 0.7 * torch.randn(r, p, generator=g) for m in maps_a]
    for maps in (maps_a, maps_b):
        offsets = [1.0 + torch.rand(p, generator=g) for _ in range(layers)]
        noise = [0.5 + 0.25 * i for i in range(layers)]
        bank = torch.empty(batches, layers, n, p)
        for b in range(batches):
            s = torch.randn(n, r, generator=torch.Generator().manual_seed(seed + 1000 + b))  # same examples for A, B
            for i in range(layers):
                torch.randn(n, p, generator=g, out=bank[b, i])
                bank[b, i].mul_(noise[i] * 8.0).addmm_(s, maps[i]).add_(offsets[i])
        banks.append(bank)
    return banks[0], banks[1]


class Tap(nn.Module):
    def __init__(self, i: int, unsqueeze: bool) -> None:
        super().__init__()
        self.i, self.unsqueeze = i, unsqueeze

    def forward(self, slab: Tensor) -> Tensor:
        return slab[self.i].unsqueeze(0) if self.unsqueeze else slab[self.i]


class Replay(nn.Module):
    """``forward(idx)`` runs ``layers`` submodules ``taps.i`` returning views of the precomputed minibatch ``idx``."""

    def __init__(self, bank: Tensor, unsqueeze: bool = False) -> None:
        super().__init__()
        self.bank = bank  # a plain attribute: .to(device) of a peer does not copy it
        self.taps = nn.ModuleList(Tap(i, unsqueeze) for i in range(bank.shape[1]))

    def forward(self, idx: Tensor) -> Tensor:
        slab = self.bank[int(idx)]
        return [t(slab) for t in self.taps][-1]


def loader_for(batches: int) -> torch.utils.data.DataLoader:
    """Yields ``(tensor(b),)`` for b = 0..batches-1 (a DataLoader, as both peers require)."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(batches)), batch_size=None)


# ------------------------------------------------------------------------------------ implementations
def reference(bank_a: Tensor, bank_b: Tensor) -> np.ndarray:
    """float64 mini-batch CKA from the HSIC_1 formula of docs/theory.md §4.4 on K~ (zero-diagonal Grams), without
    U-centring: trace term, product of sums and (K~ 1).(L~ 1) term for every pair, summed over minibatches."""
    n = bank_a.shape[2]
    c1, c2, norm = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2), 1.0 / (n * (n - 3))

    def tilde(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = torch.bmm(x.double(), x.double().mT)
        k.diagonal(dim1=1, dim2=2).zero_()
        return k.flatten(1), k.sum(2), k.sum((1, 2))

    def hsic(k: Tensor, rk: Tensor, sk: Tensor, l_: Tensor, rl: Tensor, sl: Tensor) -> Tensor:
        return (k @ l_.T + c1 * sk[:, None] * sl[None, :] - c2 * rk @ rl.T) * norm

    cross = sa = sb = 0.0
    for b in range(bank_a.shape[0]):
        ta, tb = tilde(bank_a[b]), tilde(bank_b[b])
        cross = cross + hsic(*ta, *tb)
        sa = sa + hsic(*ta, *ta).diagonal()
        sb = sb + hsic(*tb, *tb).diagonal()
    return (cross / torch.sqrt(sa[:, None] * sb[None, :])).numpy()


def run_ours(bank_a: Tensor, bank_b: Tensor, gram_dtype: torch.dtype, blocks: int = 4) -> np.ndarray:
    names = [f"taps.{i}" for i in range(bank_a.shape[1])]
    res = compare(
        Replay(bank_a),
        Replay(bank_b),
        loader_for(bank_a.shape[0]),
        layers_a=names,
        layers_b=names,
        passes=1,
        gram_dtype=gram_dtype,
        gram_blocks=blocks,
        progress=False,
    )
    return res.matrix


def run_plain(bank_a: Tensor, bank_b: Tensor, gram_dtype: torch.dtype) -> np.ndarray:
    """The plain one-matmul implementation: per-layer ``x @ x.T`` Grams, U-centred, one matmul."""
    names = [f"taps.{i}" for i in range(bank_a.shape[1])]
    la, n = len(names), bank_a.shape[2]
    cross, sa, sb = torch.zeros(la, la, dtype=F64), torch.zeros(la, dtype=F64), torch.zeros(la, dtype=F64)
    with features(Replay(bank_a), names) as ta, features(Replay(bank_b), names) as tb:
        for (idx,) in loader_for(bank_a.shape[0]):
            ga = u_center(torch.stack([x.to(gram_dtype) @ x.to(gram_dtype).T for x in ta(idx)])).flatten(1)
            gb = u_center(torch.stack([y.to(gram_dtype) @ y.to(gram_dtype).T for y in tb(idx)])).flatten(1)
            cross += ga @ gb.T / (n * (n - 3))
            sa += (ga * ga).sum(1) / (n * (n - 3))
            sb += (gb * gb).sum(1) / (n * (n - 3))
    return (cross / torch.sqrt(sa[:, None] * sb[None, :])).numpy()


def run_torch_cka(bank_a: Tensor, bank_b: Tensor) -> np.ndarray:
    from torch_cka import CKA

    names = [f"taps.{i}" for i in range(bank_a.shape[1])]
    loader = loader_for(bank_a.shape[0])
    c = CKA(Replay(bank_a), Replay(bank_b), "A", "B", model1_layers=names, model2_layers=names, device="cpu")
    c.compare(loader, loader)
    return c.export()["CKA"].double().numpy()


def run_ckatorch(bank_a: Tensor, bank_b: Tensor) -> np.ndarray:
    from ckatorch import CKA

    names = [f"taps.{i}" for i in range(bank_a.shape[1])]
    c = CKA(Replay(bank_a, unsqueeze=True), Replay(bank_b, unsqueeze=True), names, names, "A", "B")
    return c(loader_for(bank_a.shape[0]), epochs=1).double().numpy()


@contextlib.contextmanager
def quiet() -> Any:
    """Peers print tqdm bars and warn (identical names, no shuffling): keep the benchmark output readable."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------ machine
def sgemm_gflops(size: int = 4096, reps: int = 3) -> float:
    """Best-of-``reps`` fp32 matmul throughput of a ``size``^3 product (GFLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(reps))
    return 2 * size**3 / best / 1e9


def gram_vs_sgemm(
    bank_a: Tensor, bank_b: Tensor, blocks: int, center: bool, threads: int, chunks: int, per_chunk: int = 4
) -> dict[str, Any]:
    """Gram throughput of ``gram_matrices`` as ``MinibatchCKA.update`` calls it (both models' 16 layers in one
    reused stack; stacking, centring and the symmetric product included), alternating with an fp32 sgemm
    (2048^3) of similar duration, ``chunks`` times: each Gram chunk of ``per_chunk`` minibatches is compared with
    the sgemm run just before it, so both see the same machine load. Nominal FLOPs are ``2 n^2 p`` per layer and
    minibatch (a full product); the blocked product executes ``(blocks + 1) / (2 blocks)`` of them."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nb, la, n, p = bank_a.shape
        buffers: dict[Any, Tensor] = {}
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        gram_matrices(list(bank_a[0]) + list(bank_b[0]), torch.float32, blocks, center, buffers)
        sg, gr = [], []
        for c in range(chunks):
            sg.append(2 * 2048**3 / timed(lambda: a @ b)[0] / 1e9)
            ids = [(c * per_chunk + k) % nb for k in range(per_chunk)]
            t, _ = timed(
                lambda ids=ids: [
                    gram_matrices(list(bank_a[i]) + list(bank_b[i]), torch.float32, blocks, center, buffers)
                    for i in ids
                ]
            )
            gr.append(per_chunk * 2 * la * 2 * n * n * p / t / 1e9)
        ratios = [g / s_ for g, s_ in zip(gr, sg, strict=True)]
        return {
            "threads": threads,
            "blocks": blocks,
            "center": center,
            "chunks": chunks,
            "minibatches_per_chunk": per_chunk,
            "gram_nominal_gflops": gr,
            "sgemm_2048_gflops": sg,
            "median_ratio": statistics.median(ratios),
            "best_over_best": max(gr) / max(sg),
            "executed_flop_fraction": (blocks + 1) / (2 * blocks) if blocks > 1 else 1.0,
        }
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 minibatches, 1 round, ckatorch off")
    ap.add_argument("--batches", type=int, default=None, help="minibatches (default 40, 8 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--ckatorch",
        choices=["subset", "full", "off"],
        default=None,
        help="subset (default): ckatorch on the last 8 minibatches; full: all; off (--quick default)",
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cka.json"))
    args = ap.parse_args(argv)
    batches = args.batches or (8 if args.quick else 40)
    rounds = args.rounds or (1 if args.quick else 3)
    ck_mode = args.ckatorch or ("off" if args.quick else "subset")
    torch.set_num_threads(args.threads)
    layers, n, p = 8, 256, 4096
    t_start, load0 = time.time(), os.getloadavg()

    peak0 = sgemm_gflops()
    print(f"fp32 sgemm 4096^3: {peak0:.1f} GFLOP/s ({args.threads} threads)", flush=True)
    t_gen, (bank_a, bank_b) = timed(lambda: make_banks(batches, layers, n, p, seed=0))
    print(f"features: 2 x {batches} x {layers} x {n} x {p} float32 in {t_gen:.1f} s", flush=True)
    t_ref, ref = timed(lambda: reference(bank_a, bank_b))
    print(f"float64 reference in {t_ref:.1f} s; CKA range [{ref.min():.3f}, {ref.max():.3f}]", flush=True)

    impls: dict[str, Callable[[], np.ndarray]] = {
        "widesparse_f32": lambda: run_ours(bank_a, bank_b, torch.float32),
        "widesparse_f64": lambda: run_ours(bank_a, bank_b, F64),
        "plain_f32": lambda: run_plain(bank_a, bank_b, torch.float32),
    }
    missing = [m for m in ("torch_cka", "ckatorch") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"not installed, skipped: {missing} (see benchmarks/README.md)", flush=True)
    if "torch_cka" not in missing:
        impls["torch_cka"] = lambda: run_torch_cka(bank_a, bank_b)
    times: dict[str, list[float]] = {k: [] for k in impls}
    values: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name, fn in impls.items():
            with quiet():
                t, values[name] = timed(fn)
            times[name].append(t)
            print(f"round {r}: {name:15s} {t:7.2f} s", flush=True)
    ck_batches = 0
    if ck_mode != "off" and "ckatorch" not in missing:
        ck_batches = batches if ck_mode == "full" else min(8, batches)
        with quiet():
            t, values["ckatorch"] = timed(lambda: run_ckatorch(bank_a[-ck_batches:], bank_b[-ck_batches:]))
        times["ckatorch"] = [t]
        print(f"ckatorch on the last {ck_batches} minibatches (one round): {t:.2f} s", flush=True)

    print("Gram throughput vs sgemm, alternating (float32; both models' 16 layers stacked per minibatch):", flush=True)
    chunks = 4 if args.quick else 10
    grams = {}
    t = args.threads
    for threads, b, c in ((t, 4, True), (t, 4, False), (t, 2, True), (t, 1, False), (1, 4, True)):
        g = gram_vs_sgemm(bank_a, bank_b, b, c, threads, chunks)
        grams[f"threads={threads},blocks={b},center={c}"] = g
        print(
            f"  {threads} thread(s), blocks={b}, center={c}: Gram {statistics.median(g['gram_nominal_gflops']):.1f} "
            f"nominal GFLOP/s, sgemm {statistics.median(g['sgemm_2048_gflops']):.1f} (medians); median ratio "
            f"{g['median_ratio']:.0%}, best/best {g['best_over_best']:.0%}",
            flush=True,
        )

    # why peers differ: ckatorch overwrites per batch, so its value is the CKA of the last minibatch alone
    last = MinibatchCKA(layers, layers)
    last.update(list(bank_a[-1]), list(bank_b[-1]))
    last_only = last.compute().numpy()
    errors = {k: float(np.abs(v - ref).max()) for k, v in values.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = {
        k: [tc / t for tc, t in zip(times.get("torch_cka", []), times[k], strict=False)]
        for k in ("widesparse_f32", "widesparse_f64", "plain_f32")
    }
    frac = grams[f"threads={args.threads},blocks=4,center=True"]["median_ratio"]
    speedup = statistics.median(per_round["widesparse_f32"]) if "torch_cka" in times else None
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_cka.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "sgemm_4096_gflops_at_start": peak0,
            "note": "2 cores shared with other jobs: absolute times vary run to run; "
            "compare implementations through the per-round ratios",
        },
        "workload": {
            "layers_a": layers,
            "layers_b": layers,
            "minibatches": batches,
            "batch_size": n,
            "features_per_layer": p,
            "passes": 1,
            "rounds": rounds,
            "device": "cpu",
            "ckatorch_minibatches": ck_batches,
            "forward": "replay model: hooked submodules return views of precomputed float32 features",
        },
        "seconds": times,
        "median_seconds": med,
        "ckatorch_seconds_per_minibatch": times["ckatorch"][0] / ck_batches if ck_batches else None,
        "torch_cka_time_over": {k: {"per_round": v, "median": statistics.median(v)} for k, v in per_round.items()}
        if speedup is not None
        else None,
        "peers_not_installed": missing,
        "max_abs_error_vs_float64_reference": errors,
        "ckatorch_vs_last_minibatch_only": float(np.abs(values["ckatorch"] - last_only).max())
        if "ckatorch" in values
        else None,
        "gram_matrices_float32_vs_sgemm": grams,
        "gram_fraction_of_sgemm": frac,
        "targets": {
            "values_within_1e-6": errors["widesparse_f32"] <= 1e-6 and errors["widesparse_f64"] <= 1e-6,
            "speedup_at_least_5x_vs_torch_cka": None if speedup is None else speedup >= 5.0,
            "gram_at_least_60pct_of_sgemm": frac >= 0.6,
        },
        "notes": NOTES
        | {
            "cuda": "no CUDA device on the machine that wrote this file"
            if not torch.cuda.is_available()
            else "see the cuda section"
        },
    }
    if torch.cuda.is_available():
        result["cuda"] = run_cuda(bank_a, bank_b, ref, rounds)
    result["wall_seconds"] = time.time() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "median_seconds",
        "torch_cka_time_over",
        "max_abs_error_vs_float64_reference",
        "gram_fraction_of_sgemm",
        "ckatorch_vs_last_minibatch_only",
        "targets",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    print(f"wrote {out} in {result['wall_seconds']:.0f} s")
    return result


NOTES = {
    "torch_cka": "agrees to float32 rounding (float32 Grams, uncentred, float32 accumulators); its cost is an O(n^3) "
    "trace(K @ L) per pair with HSIC(L, L) recomputed inside the pair loop and 3 .item() syncs per HSIC. It never "
    "removes its hooks and returns NaN for n <= 3.",
    "ckatorch": "overwrites cka_epoch[i, j] per minibatch (ckatorch/cka.py), so with several minibatches its value "
    "is the CKA of the last minibatch alone: ckatorch_vs_last_minibatch_only is rounding, its error against the "
    "mini-batch reference is not. Its value does not depend on how many minibatches it sees, so by default it "
    "runs on the last 8 of them (its cost per minibatch is constant; --ckatorch full runs all). It needs 3-d "
    "(groups, n, p) activations (2-d ones fail in torch.bmm) and reads dim 1 as the examples, so its replay model "
    "returns (1, n, p) views. It recomputes both float64 Grams for every layer pair, O(n^3) HSIC by bmm.",
    "plain_f32": "the issue's plain one-matmul implementation: per-layer x @ x.T float32 Grams (fresh tensors, no "
    "stacking, no symmetric blocks, no centring), U-centred in float64, one cross matmul.",
    "gram_fraction": "median over alternating chunks of (Gram nominal GFLOP/s) / (sgemm 2048^3 GFLOP/s just "
    "before), 2 threads, blocks=4, centring on. Nominal FLOPs are 2 n^2 p per layer and minibatch; the symmetric "
    "blocked product executes 5/8 of them; stacking and centring are inside the timed region.",
}


def run_cuda(bank_a: Tensor, bank_b: Tensor, ref: np.ndarray, rounds: int) -> dict[str, Any]:
    """The same workload on CUDA: features resident on the GPU, float32 and float64 Grams (not run here: the
    machine that wrote the committed JSON has no GPU)."""
    da, db = bank_a.cuda(), bank_b.cuda()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    for name, dt in (("widesparse_f32", torch.float32), ("widesparse_f64", F64)):
        run_ours(da[:2], db[:2], dt)  # warm-up: kernels, allocator
        ts, m = [], None
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = run_ours(da, db, dt)  # ends with .cpu(): synchronised
            ts.append(time.perf_counter() - t0)
        out[name] = {
            "seconds": ts,
            "median_seconds": statistics.median(ts),
            "max_abs_error": float(np.abs(m - ref).max()),
        }
    return out


if __name__ == "__main__":
    main()
