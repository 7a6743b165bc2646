"""MonarchLinear forward + backward vs torch-structured's Monarch layer and a dense nn.Linear.

Every layer maps ``n -> n`` on a batch of ``--batch`` (default 128) float32 rows; the input requires grad, as
inside a network, and a step is ``y = layer(x); y.backward(g)`` with gradients reset to ``None`` before it. The
Monarch layers are square Monarch matrices with ``nblocks = b = sqrt(n)`` (``2 n^1.5`` weights); torch-structured's
``MonarchLinear(n, n, nblocks=b)`` has the same parametrisation, which is checked (same weights, same outputs)
before timing. ``ours_tied`` (``V^T ⊗ W``, the linear S-Mixer layer) is timed for reference.

The machine is shared, so only ratios measured side by side mean anything: the implementations alternate step by
step within one process, and each gets the median and the minimum over ``--reps`` steps after warm-up steps;
ratios and targets are given for both (on a busy shared CPU the minimum is the least disturbed estimate, the median
the typical step).
torch-structured is skipped, with the reason recorded, when it cannot be imported (it needs ``triton``). CUDA is
measured too when a device is available (synchronised timings).

    python benchmarks/bench_monarch.py [--quick] [--threads 1,2] [--reps N] [--out benchmarks/results/monarch.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widesparse.layers.monarch import MonarchLinear, TiedMonarchLinear

ROOT = Path(__file__).resolve().parents[1]


def load_torch_structured() -> tuple[Any, str | None, str | None]:
    """``(MonarchLinear class or None, version, reason skipped)``; its import warnings are silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch_structured
            from torch_structured.monarch.monarch_linear import MonarchLinear as TSMonarch
        return TSMonarch, getattr(torch_structured, "__version__", None), None
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip the peer, say why
        return None, None, f"{type(exc).__name__}: {exc}"


def build(n: int, device: str, ts_cls: Any) -> tuple[dict[str, nn.Module], float | None]:
    """The layers of one size (same Monarch weights in ours and torch-structured's) and their max output gap."""
    b = math.isqrt(n)
    if b * b != n:
        raise ValueError(f"n = {n} is not a square; the square Monarch layers need n = b^2")
    g = torch.Generator().manual_seed(0)
    layers: dict[str, nn.Module] = {"ours": MonarchLinear(n, n, b, generator=g)}
    gap = None
    if ts_cls is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = ts_cls(n, n, nblocks=b)
        with torch.no_grad():
            ts.w1.copy_(layers["ours"].weight_r)
            ts.w2.copy_(layers["ours"].weight_l)
            ts.bias.copy_(layers["ours"].bias)
        layers["torch_structured"] = ts
    layers["ours_tied"] = TiedMonarchLinear(n, n, b, generator=g)
    torch.manual_seed(0)
    layers["dense"] = nn.Linear(n, n)
    layers = {k: v.to(device) for k, v in layers.items()}
    if "torch_structured" in layers:
        x = torch.randn(4, n, generator=g).to(device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gap = (layers["ours"](x) - layers["torch_structured"](x)).abs().max().item()
    return layers, gap


def make_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step() -> float:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        sync()
        t0 = time.perf_counter()
        layer(x).backward(grad)
        sync()
        return time.perf_counter() - t0

    return step


def time_side_by_side(steps: dict[str, Callable[[], float]], reps: int, warmup: int) -> dict[str, dict[str, float]]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(step())
    return {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "reps": len(v)} for k, v in times.items()
    }


def run_size(n: int, device: str, threads: int, batch: int, reps: int, ts_cls: Any) -> dict[str, Any]:
    if device == "cpu":
        torch.set_num_threads(threads)
    layers, gap = build(n, device, ts_cls)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n, generator=g).to(device).requires_grad_()
    grad = torch.randn(batch, n, generator=g).to(device)
    dense_reps = max(3, reps // 4) if n >= 16384 and device == "cpu" else reps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-structured's deprecated torch.cuda.amp decorators
        fast = {k: make_step(v, x, grad) for k, v in layers.items() if k != "dense"}
        res = time_side_by_side({**fast, "dense": make_step(layers["dense"], x, grad)}, dense_reps, warmup=2)
        if dense_reps < reps:  # the structured layers get their full count, still side by side among themselves
            res.update(time_side_by_side(fast, reps, warmup=1))
    for k, v in layers.items():
        res[k]["params"] = sum(p.numel() for p in v.parameters())
    ratios = {
        stat: {f"{k}_over_ours": res[k][f"{stat}_ms"] / res["ours"][f"{stat}_ms"] for k in res if k != "ours"}
        for stat in ("median", "min")
    }
    out = {"device": device, "threads": threads if device == "cpu" else None, "n": n, "nblocks": math.isqrt(n)}
    return {**out, "batch": batch, "impl": res, "ratios": ratios, "max_abs_diff_ours_vs_torch_structured": gap}


def targets(runs: list[dict[str, Any]], has_ts: bool) -> dict[str, Any]:
    """The two CPU targets, judged on the median and on the minimum step time (ratios > 1: ours faster)."""
    cpu = [r for r in runs if r["device"] == "cpu"]
    out: dict[str, Any] = {}
    for stat in ("median", "min"):
        ts = [r["ratios"][stat].get("torch_structured_over_ours") for r in cpu if r["n"] == 4096]
        ok_ts = all(v >= 1.0 for v in ts) if has_ts and ts and None not in ts else None
        dense = {
            f"n={r['n']},threads={r['threads']}": r["ratios"][stat]["dense_over_ours"] for r in cpu if r["n"] >= 4096
        }
        out[stat] = {
            "ours_at_least_as_fast_as_torch_structured_at_4096": ok_ts,
            "ours_faster_than_dense_from_4096": all(v > 1.0 for v in dense.values()) if dense else None,
            "torch_structured_over_ours_at_4096": ts,
            "dense_over_ours_from_4096": dense,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n in {1024, 4096}, 5 repetitions")
    ap.add_argument("--sizes", default=None, help="comma-separated n (squares), default 1024,4096,16384")
    ap.add_argument("--threads", default=None, help="comma-separated CPU thread counts (default: torch's)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per implementation (default 40; quick 5)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--devices", default=None, help="comma-separated, default cpu (+ cuda when available)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "monarch.json"))
    args = ap.parse_args(argv)

    sizes = (
        [int(s) for s in args.sizes.split(",")] if args.sizes else ([1024, 4096] if args.quick else [1024, 4096, 16384])
    )
    reps = args.reps or (5 if args.quick else 40)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ts_cls, ts_version, ts_skip = load_torch_structured()
    if ts_skip:
        print(f"torch-structured skipped: {ts_skip}", file=sys.stderr)

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    runs = []
    for device in devices:
        for th in threads if device == "cpu" else [None]:
            for n in sizes:
                r = run_size(n, device, th or 1, args.batch, reps, ts_cls)
                runs.append(r)
                summary = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in r["impl"].items())
                print(f"{device} threads={th} n={n}: {summary}", file=sys.stderr)
    report = {
        "benchmark": "monarch",
        "command": " ".join(["python", "benchmarks/bench_monarch.py", *(argv if argv is not None else sys.argv[1:])]),
        "what": "forward + backward of one n -> n layer, float32, input requires grad; median over reps, "
        "implementations alternating step by step",
        "torch": torch.__version__,
        "torch_structured": ts_version,
        "torch_structured_skipped": ts_skip,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "seconds": time.perf_counter() - t0,
        "reps": reps,
        "runs": runs,
        "targets": targets(runs, ts_cls is not None),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
