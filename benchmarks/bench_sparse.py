"""SparseLinear vs MaskedLinear: one training step of the layers m -> γm -> m, side by side (docs/theory.md E10).

A step is forward + backward + an AdamW step of ``fc2(gelu(fc1(x)))`` on a batch of 128 (the input requires grad,
as inside a network). Both storages are built from the same mask seeds and global RNG state, so they are the same
layer (checked). Times: the two step functions alternate in one process (the machine is shared, so only the
ratio measured side by side means anything), median over ``--reps`` after one warm-up step. Peak memory: each
storage in a fresh child process; the peak resident set (VmHWM, reset through /proc/self/clear_refs after the
imports and a warm-up of the kernels) minus the resident set at that point, so it counts parameters, gradients,
AdamW state, masks/indices, activations and kernel temporaries as allocated. Masked runs whose estimated bytes
exceed ``--max-masked-gib`` are not run; their estimate is reported.

The SW-MLP target (``--big``): an SW-MLP at the effective width of a Mixer with S = C = 128 (m = 16,384), γ = 4,
depth 8, p = 1/128 builds and runs one training step; peak resident memory of the whole process is reported with
the estimate for the dense-masked version.

    python benchmarks/bench_sparse.py [--quick] [--threads 1,2] [--big] [--out benchmarks/results/sparse.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widesparse.analysis.profiling import reset_peak_rss, status_bytes, trim_heap
from widesparse.layers.sparse import MaskedLinear, SparseLinear

ROOT = Path(__file__).resolve().parents[1]
MASKED_BYTES_PER_WEIGHT = 21  # weight 4 + grad 4 + AdamW state 8 + bool mask 1 + masked product saved for backward 4
SPARSE_BYTES_PER_CONNECTION = 28  # value 4 + grad 4 + AdamW 8 + col/row/perm int32 indices 12
GIB = 2**30


# --------------------------------------------------------------------------------------------- measuring
def _status_kib(key: str) -> int:
    return status_bytes(key) // 1024


_reset_peak = reset_peak_rss


def build(backend: str, m: int, gamma: int, p: float, dtype: torch.dtype = torch.float32,
          device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    cls = SparseLinear if backend == "sparse" else MaskedLinear
    torch.manual_seed(0)
    net = nn.Sequential(cls(m, gamma * m, p, seed=1, dtype=dtype, device=device), nn.GELU(),
                        cls(gamma * m, m, p, seed=2, dtype=dtype, device=device))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)


def make_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor):
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        y = net(x)
        loss = (y * target).sum()
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def inputs(m: int, batch: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, m, generator=g).to(device).requires_grad_(True)
    return x, torch.randn(batch, m, generator=g).to(device)


_trim = trim_heap


def child_memory(backend: str, m: int, gamma: int, p: float, batch: int, steps: int, device: str) -> dict[str, Any]:
    """Run in a fresh process: peak bytes of the training steps (and, apart, of building the layers)."""
    warm, _ = build(backend, 64, 2, 0.25, device=device)  # load the kernels (MKL sparse, AdamW) before the baseline
    w_opt = torch.optim.AdamW(warm.parameters())
    make_step(warm, w_opt, *inputs(64, 4, device))()
    del warm, w_opt
    _trim()
    if device == "cuda":
        torch.cuda.synchronize()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = _status_kib("VmRSS") * 1024
    exact = _reset_peak()
    t0 = time.perf_counter()
    net, opt = build(backend, m, gamma, p, device=device)
    t_build = time.perf_counter() - t0
    build_peak = _status_kib("VmHWM") * 1024 - base_rss
    _trim()
    built = _status_kib("VmRSS") * 1024 - base_rss
    _reset_peak()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x, target = inputs(m, batch, device)
    step = make_step(net, opt, x, target)
    times = [sum(step()) for _ in range(steps)]
    out = {"backend": backend, "build_s": t_build, "step_s": times, "baseline_rss_bytes": base_rss,
           "peak_reset": exact, "build_peak_bytes": build_peak, "after_build_bytes": built,
           "peak_bytes": _status_kib("VmHWM") * 1024 - base_rss,
           "connections": sum(getattr(mod, "connections", 0) for mod in net.modules())}
    if device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    return out


def child_time(m: int, gamma: int, p: float, batch: int, reps: int, run_masked: bool, device: str) -> dict[str, Any]:
    """Run in a fresh process (own thread count and OpenMP wait policy): :func:`time_side_by_side`."""
    out = time_side_by_side(m, gamma, p, batch, reps, run_masked, device)
    out["threads"] = torch.get_num_threads()
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    return out


def child_big(batch: int, device: str) -> dict[str, Any]:
    """The SW-MLP at S = C = 128 (m = 16,384), γ = 4, depth 8, p = 1/128: build and one training step."""
    from widesparse.effective import describe
    from widesparse.models import create_model
    from widesparse.models.sw_mlp import SwMlp  # noqa: F401  (registers sw_mlp)

    base_rss = _status_kib("VmRSS") * 1024
    kw = {"image_size": 32, "patch_size": (4, 2), "in_chans": 3, "dim": 128, "depth": 8, "gamma": 4,
          "density": 1 / 128, "num_classes": 10}
    meta = describe(create_model("sw_mlp", device="meta", **kw))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("sw_mlp", device=device, **kw)
    t_build = time.perf_counter() - t0
    rss_built = _status_kib("VmRSS") * 1024
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") * 1024
    dense = meta.dense_weights
    return {
        "config": {**kw, "patch_size": list(kw["patch_size"]), "batch": batch, "S": model.num_tokens, "C": model.dim,
                   "m": model.width, "hidden": list(model.sizes.hidden)},
        "connections": meta.connections, "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": t_build, "step_s": times, "loss": loss.item(),
        "peak_rss_bytes": peak, "peak_rss_gib": peak / GIB, "baseline_rss_bytes": base_rss,
        "rss_after_build_bytes": rss_built, "target_gib": 10, "within_target": peak <= 10 * GIB,
        "masked_dense_weights": dense, "masked_estimated_bytes": dense * MASKED_BYTES_PER_WEIGHT,
        "masked_estimated_gib": dense * MASKED_BYTES_PER_WEIGHT / GIB,
        "masked_estimate_counts": "per dense weight: weight 4 + grad 4 + AdamW 8 + bool mask 1 + saved product 4 bytes",
    }


def _run_child(args: list[str], threads: int, passive: bool = False, live: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if live:  # glibc returns every freed block >= 64 KiB to the OS: the RSS follows the live allocations
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        return {"error": f"child exited with {res.returncode}: {res.stderr.strip()[-2000:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ driver
def time_side_by_side(m: int, gamma: int, p: float, batch: int, reps: int, run_masked: bool,
                      device: str) -> dict[str, Any]:
    nets = {b: build(b, m, gamma, p, device=device) for b in (("sparse", "masked") if run_masked else ("sparse",))}
    x, target = inputs(m, batch, device)
    out: dict[str, Any] = {}
    if run_masked:
        with torch.no_grad():
            ys, ym = nets["sparse"][0](x), nets["masked"][0](x)
            out["max_abs_diff_outputs"] = (ys - ym).abs().max().item()
            out["max_abs_output"] = ym.abs().max().item()
    steps = {b: make_step(net, opt, x, target) for b, (net, opt) in nets.items()}
    phases: dict[str, list[tuple[float, float, float]]] = {b: [] for b in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(reps):
        for b, step in steps.items():
            phases[b].append(step())
    for b, rows in phases.items():
        tot = sorted(sum(r) for r in rows)
        out[b] = {
            "step_ms_median": 1e3 * tot[len(tot) // 2], "step_ms_min": 1e3 * tot[0],
            "step_ms_all": [1e3 * t for t in tot],
            "forward_ms_median": 1e3 * sorted(r[0] for r in rows)[len(rows) // 2],
            "backward_ms_median": 1e3 * sorted(r[1] for r in rows)[len(rows) // 2],
            "adamw_ms_median": 1e3 * sorted(r[2] for r in rows)[len(rows) // 2],
        }
    if run_masked:
        out["time_ratio_masked_over_sparse"] = out["masked"]["step_ms_median"] / out["sparse"]["step_ms_median"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="m in {1024, 4096}, p = 1/64 only, 3 repetitions")
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts (default: torch's)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--max-masked-gib", type=float, default=8.0)
    ap.add_argument("--big", action="store_true", help="also the m = 16,384, γ = 4, depth 8 SW-MLP training step")
    ap.add_argument("--big-batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse.json"))
    ap.add_argument("--omp-passive", action="store_true",
                    help="also time every multi-thread setting with OMP_WAIT_POLICY=PASSIVE (no spin-waiting)")
    ap.add_argument("--child-mem", nargs=4, metavar=("BACKEND", "M", "GAMMA", "P"), help=argparse.SUPPRESS)
    ap.add_argument("--child-time", nargs=4, metavar=("M", "GAMMA", "P", "MASKED"), help=argparse.SUPPRESS)
    ap.add_argument("--child-big", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    thread_list = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    torch.set_num_threads(thread_list[0])

    if args.child_mem:
        b, m, g, p = args.child_mem
        print(json.dumps(child_memory(b, int(m), int(g), float(p), args.batch, 2, args.device)))
        return 0
    if args.child_time:
        m, g, p, masked = args.child_time
        print(json.dumps(child_time(int(m), int(g), float(p), args.batch, args.reps, masked == "1", args.device)))
        return 0
    if args.child_big:
        print(json.dumps(child_big(args.big_batch, args.device)))
        return 0

    widths = (1024, 4096) if args.quick else (1024, 4096, 16384)
    densities = (1 / 64,) if args.quick else (1 / 16, 1 / 64, 1 / 256)
    reps = args.reps or (3 if args.quick else 5)
    variants = [(t, False) for t in thread_list] + [(t, True) for t in thread_list if t > 1 and args.omp_passive]
    g = args.gamma
    report: dict[str, Any] = {
        "benchmark": "SparseLinear vs MaskedLinear, layers m -> γm -> m, forward + backward + AdamW step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "batch": args.batch, "gamma": g, "reps": reps, "loadavg_start": os.getloadavg(),
        "memory_method": "fresh child per storage; peak_bytes: peak RSS (VmHWM, reset via /proc/self/clear_refs "
                         "after building) during the training steps minus the RSS before building; build peak apart. "
                         "'memory' with the default glibc allocator (freed heap blocks stay resident); 'memory_live' "
                         "with MALLOC_MMAP_THRESHOLD_=65536 so that the RSS follows live allocations",
        "timing_method": "fresh child per thread setting; both storages alternate step by step; median of reps",
        "configs": [],
    }
    for m in widths:
        for p in densities:
            nw = 2 * g * m * m
            nnz = round(p * nw)
            est_masked = nw * MASKED_BYTES_PER_WEIGHT
            run_masked = est_masked <= args.max_masked_gib * GIB
            cfg: dict[str, Any] = {"m": m, "hidden": g * m, "density": p, "density_label": f"1/{round(1 / p)}",
                                   "dense_weights": nw, "expected_connections": nnz,
                                   "masked_estimated_bytes": est_masked,
                                   "sparse_estimated_bytes": nnz * SPARSE_BYTES_PER_CONNECTION,
                                   "masked_run": run_masked}
            if not run_masked:
                cfg["masked_skipped"] = (f"estimated {est_masked / GIB:.1f} GiB > --max-masked-gib "
                                         f"{args.max_masked_gib:g}: would not fit")
            print(f"m={m} p=1/{round(1 / p)}: memory ...", file=sys.stderr, flush=True)
            for live in (False, True):
                mem = {}
                for b in ("sparse", "masked") if run_masked else ("sparse",):
                    mem[b] = _run_child(["--child-mem", b, str(m), str(g), str(p), "--batch", str(args.batch),
                                         "--device", args.device], 1, live=live)
                if run_masked and "peak_bytes" in mem["masked"] and "peak_bytes" in mem["sparse"]:
                    ratio = mem["masked"]["peak_bytes"] / mem["sparse"]["peak_bytes"]
                    cfg["memory_ratio_masked_over_sparse" + ("_live" if live else "")] = ratio
                cfg["memory_live" if live else "memory"] = mem
            cfg["timing"] = {}
            for t, passive in variants:
                key = f"{t}" + ("-passive" if passive else "")
                print(f"m={m} p=1/{round(1 / p)}: timing, {key} thread(s) ...", file=sys.stderr, flush=True)
                cfg["timing"][key] = _run_child(["--child-time", str(m), str(g), str(p), "1" if run_masked else "0",
                                                 "--batch", str(args.batch), "--reps", str(reps), "--device",
                                                 args.device], t, passive)
            report["configs"].append(cfg)
            _summary_line(cfg)
    if args.big:
        print("SW-MLP m = 16,384, γ = 4, depth 8, p = 1/128: build and one step ...", file=sys.stderr, flush=True)
        report["sw_mlp_big"] = _run_child(["--child-big", "--big-batch", str(args.big_batch), "--device",
                                           args.device], thread_list[0])
        print(json.dumps(report["sw_mlp_big"], indent=1), file=sys.stderr)
    report["loadavg_end"] = os.getloadavg()
    report["targets"] = _targets(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["targets"], indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _summary_line(cfg: dict[str, Any]) -> None:
    parts = [f"m={cfg['m']:>6} p={cfg['density_label']:>6}"]
    for t, tim in cfg["timing"].items():
        if "sparse" not in tim:
            parts.append(f"[{t}] {tim.get('error', 'failed')}")
            continue
        s = tim["sparse"]["step_ms_median"]
        msk = f"{tim['masked']['step_ms_median']:9.1f}" if "masked" in tim else "      n/a"
        r = f"{tim['time_ratio_masked_over_sparse']:6.1f}x" if "time_ratio_masked_over_sparse" in tim else "   n/a"
        parts.append(f"[{t} thr] sparse {s:8.1f} ms masked {msk} ms ratio {r}")
    mem = cfg["memory"]
    sp = mem["sparse"].get("peak_bytes", float("nan")) / 2**20
    mk = mem.get("masked", {}).get("peak_bytes", cfg["masked_estimated_bytes"]) / 2**20
    tag = "" if cfg["masked_run"] else " (masked estimated, not run)"
    ratio, live = cfg.get("memory_ratio_masked_over_sparse"), cfg.get("memory_ratio_masked_over_sparse_live")
    parts.append(f"peak MiB sparse {sp:.1f} masked {mk:.1f}{tag}" + (f" ratio {ratio:.1f}x" if ratio else "")
                 + (f" (live allocator {live:.1f}x)" if live else ""))
    print("  ".join(parts), file=sys.stderr, flush=True)


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in report["configs"]:
        if cfg["m"] == 4096 and cfg["density_label"] == "1/64":
            tim = {t: v for t, v in cfg["timing"].items() if "sparse" in v}
            ratios = {t: v.get("time_ratio_masked_over_sparse") for t, v in tim.items()}
            out["m4096_p1_64"] = {
                "time_ratio_by_setting": ratios,
                "sparse_step_ms_by_setting": {t: v["sparse"]["step_ms_median"] for t, v in tim.items()},
                "masked_step_ms_by_setting": {t: v.get("masked", {}).get("step_ms_median") for t, v in tim.items()},
                "time_target_10x_by_setting": {t: (r or 0) >= 10 for t, r in ratios.items()},
                "memory_ratio": cfg.get("memory_ratio_masked_over_sparse"),
                "memory_ratio_live_allocator": cfg.get("memory_ratio_masked_over_sparse_live"),
                "memory_target_20x": (cfg.get("memory_ratio_masked_over_sparse") or 0) >= 20,
                "memory_target_20x_live_allocator": (cfg.get("memory_ratio_masked_over_sparse_live") or 0) >= 20,
            }
    if "sw_mlp_big" in report and "peak_rss_gib" in report["sw_mlp_big"]:
        big = report["sw_mlp_big"]
        out["sw_mlp_m16384"] = {"peak_rss_gib": big["peak_rss_gib"], "within_10_gib": big["within_target"],
                                "masked_estimated_gib": big["masked_estimated_gib"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
