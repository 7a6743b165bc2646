"""Mixer training-step throughput: widesparse Mixer / RP-Mixer vs lucidrains' mlp-mixer-pytorch (and timm).

Workload: 32x32x3 images, patch 4 (S = 64), C = 128, depth 8, token hidden 64, channel hidden 512,
10 classes, batch 128, forward + backward + AdamW step. Every model has exactly 1,132,170 parameters; the
script asserts it before timing. Each of ``--reps`` rounds steps every model in an order that rotates, so
background load hits every model alike, and times the second of two back-to-back steps of each (``--settle``,
the default): a step timed right after another model's step ran up to 6.5% slower (measured: ours after timm's
child 136.8 ms, after lucidrains 128.4 ms), and a fixed rotation always puts the same model after the same
other. "ours faster by" is the median over rounds of the per-round ratio (the ratio of the best steps is
printed beside it). MFU (of the best step) is against the matmul peak measured in
the same run, the faster of torch.mm and oneDNN. glibc keeps freed memory for every model (``--keep-heap``).

    python benchmarks/bench_mixer.py [--quick] [--precision fp32,bf16] [--timm-python PATH]

``--timm-python`` points at the interpreter of a separate environment with timm (timm needs torchvision, which
does not import beside the CPU torch wheel): ``pip install torch==2.14.1 torchvision==0.29.1 timm``. timm's
model then runs in that interpreter as a child process that takes one step per request, interleaved with ours
in every round (its torch version differs: the ratio compares stacks, not only models).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOAD = {"image_size": 32, "patch_size": 4, "in_chans": 3, "dim": 128, "depth": 8, "token_hidden": 64,
            "channel_hidden": 512, "num_classes": 10, "batch": 128}
PARAMS = 1_132_170


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n x n product in ``dtype`` per route (``torch.mm``; oneDNN on the CPU) and their max.

    On AMD CPUs MKL's float32 ``torch.mm`` runs without AVX-512 (about 211 GFLOP/s here) while oneDNN reaches
    about 469 GFLOP/s: MFU is quoted against the faster, the machine's real peak.
    """
    from widesparse.ops.matmul import gemm_peaks

    peaks = gemm_peaks(dtype, n=n, reps=reps)
    return {**peaks, "best": max(peaks.values())}


def step_flops(w: dict = WORKLOAD) -> float:
    """Matmul FLOPs of one training step (forward x 3 for forward + backward)."""
    S = (w["image_size"] // w["patch_size"]) ** 2
    C, B = w["dim"], w["batch"]
    patch = w["patch_size"] ** 2 * w["in_chans"]
    fwd = 2 * S * patch * C  # stem
    fwd += w["depth"] * (2 * 2 * C * S * w["token_hidden"] + 2 * 2 * S * C * w["channel_hidden"])
    fwd += 2 * C * w["num_classes"]
    return 3 * fwd * B


def build_models(names: list[str]) -> dict[str, nn.Module]:
    from widesparse.models import create_model

    w = {k: v for k, v in WORKLOAD.items() if k != "batch"}
    models: dict[str, nn.Module] = {}
    for name in names:
        if name in ("widesparse_mixer", "widesparse_rp_mixer"):
            models[name] = create_model(name.removeprefix("widesparse_"), **w)
        elif name == "lucidrains":
            from mlp_mixer_pytorch import MLPMixer

            # lucidrains sizes both hidden widths from dim: token = 0.5 C = 64, channel = 4 C = 512
            models[name] = MLPMixer(image_size=32, channels=3, patch_size=4, dim=128, depth=8, num_classes=10,
                                    expansion_factor=0.5, expansion_factor_token=4)
        else:
            raise ValueError(f"unknown model {name!r}")
        n = sum(p.numel() for p in models[name].parameters())
        if n != PARAMS:
            raise AssertionError(f"{name} has {n:,} parameters, expected {PARAMS:,}: configurations differ")
    return models


def time_steps(models: dict[str, nn.Module], precision: str, reps: int, warmup: int = 2,
               timm: TimmStepper | None = None, settle: bool = True) -> dict[str, list[float]]:
    """Seconds of each training step of each model, per round: every round steps each model (and timm's
    child), in an order that rotates from round to round, so load and drift hit every model alike. ``settle``:
    each timed step follows an untimed step of the same model, as in training, not another model's step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORKLOAD["batch"], 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (WORKLOAD["batch"],), generator=g)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in models.items()}
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def ours(n: str) -> float:
        t = time.perf_counter()
        with ctx():
            loss = nn.functional.cross_entropy(models[n](x), y)
        opts[n].zero_grad(set_to_none=True)
        loss.backward()
        opts[n].step()
        return time.perf_counter() - t

    steppers = {n: (lambda n=n: ours(n)) for n in models}
    if timm is not None:
        steppers["timm"] = timm.step
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + reps):
        for n in names[i % len(names):] + names[: i % len(names)]:
            if settle:
                steppers[n]()
            dt = steppers[n]()
            if i >= warmup:
                times[n].append(dt)
    return times


def summarize(times: dict[str, list[float]], flops: float, peak: float) -> dict[str, dict[str, float]]:
    """Best and median step per model, MFU of the best, and how many times faster our Mixer is than each: the
    median over rounds of the per-round ratio (robust to drift and load) and the ratio of the bests."""
    ours = times["widesparse_mixer"]
    runs = {}
    for n, ts in times.items():
        best = min(ts)
        runs[n] = {"step_s": best, "step_s_median": statistics.median(ts), "images_per_s": WORKLOAD["batch"] / best,
                   "mfu": flops / best / 1e9 / peak,
                   "our_speedup_vs_this": statistics.median(t / o for t, o in zip(ts, ours, strict=True)),
                   "our_speedup_best_of": best / min(ours), "rounds": ts}
    return runs


_TIMM_CHILD = """
import sys, time, torch, timm
from torch import nn
from contextlib import nullcontext
threads, params, precision, keep_heap = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
torch.set_num_threads(threads)
if keep_heap:  # as widesparse.ops.matmul.keep_freed_memory in the parent
    import ctypes
    libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 32 << 20); libc.mallopt(-1, 1 << 30)
torch.manual_seed(0)
m = timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, in_chans=3, patch_size=4, num_blocks=8,
                                   embed_dim=128, mlp_ratio=(0.5, 4.0))
n = sum(p.numel() for p in m.parameters())
assert n == params, f"timm MlpMixer has {n} parameters, expected {params}"
g = torch.Generator().manual_seed(0)
x = torch.randn(128, 3, 32, 32, generator=g); y = torch.randint(0, 10, (128,), generator=g)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
print("ready " + torch.__version__ + " timm " + timm.__version__, flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    with ctx():
        loss = nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    print(time.perf_counter() - t, flush=True)
"""


class TimmStepper:
    """timm's MlpMixer (same widths, 1,132,170 parameters) in another interpreter, stepped on request, so its
    steps interleave with ours (timm needs torchvision, which does not import beside the CPU torch wheel)."""

    def __init__(self, python: str, precision: str, keep_heap: bool = False) -> None:
        self.proc = subprocess.Popen([python, "-c", _TIMM_CHILD, str(torch.get_num_threads()), str(PARAMS),
                                      precision, str(int(keep_heap))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError(f"timm child did not start (exit {self.proc.poll()}): {line!r}")
        self.version = line.removeprefix("ready ")

    def step(self) -> float:
        self.proc.stdin.write("step\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return float(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--reps", type=int, default=9, help="rounds (default 9; 3 with --quick)")
    ap.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timm-python", default=None)
    ap.add_argument("--out", default=str(RESULTS / "mixer.json"))
    ap.add_argument("--settle", action=argparse.BooleanOptionalAction, default=True,
                    help="time the second of two back-to-back steps of each model (default: on): no timed step "
                         "follows another model's")
    ap.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                    help="glibc keeps freed memory (widesparse.ops.matmul.keep_freed_memory, as `widesparse train` "
                         "does on the CPU), for every model alike and timm's child too: removes the page-fault "
                         "noise of fresh allocations (default: on)")
    args = ap.parse_args(argv)
    bad = [p for p in args.precision.split(",") if p not in ("fp32", "bf16")]
    if bad:
        ap.error(f"--precision: unknown {', '.join(map(repr, bad))}; valid: fp32, bf16 (comma-separated)")
    torch.set_num_threads(args.threads)
    if args.keep_heap:
        from widesparse.ops.heap import keep_freed_memory

        keep_freed_memory()
    reps = 3 if args.quick else args.reps
    names = ["widesparse_mixer", "widesparse_rp_mixer"]
    try:
        import mlp_mixer_pytorch  # noqa: F401

        names.append("lucidrains")
    except ImportError:
        print("mlp-mixer-pytorch not installed (pip install -e '.[bench]'): lucidrains skipped", file=sys.stderr)
    from widesparse.ops.cpu_kernels import status as cpu_kernels_status

    routes = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peaks = {prec: r["best"] for prec, r in routes.items()}
    flops = step_flops()
    result: dict = {"workload": WORKLOAD, "params": PARAMS, "keep_heap": args.keep_heap, "settle": args.settle,
                    "step_gflop": flops / 1e9, "threads": args.threads,
                    "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                    "cpu_kernels": cpu_kernels_status(), "matmul_peak_gflops": peaks,
                    "matmul_peak_by_route": routes, "runs": {}}
    for prec in args.precision.split(","):
        torch.manual_seed(0)
        timm = None
        if args.timm_python:
            try:
                timm = TimmStepper(args.timm_python, prec, args.keep_heap)
                result["timm"] = timm.version
            except (OSError, RuntimeError) as e:
                print(f"timm skipped: {e}", file=sys.stderr)
        try:
            times = time_steps(build_models(names), prec, reps, timm=timm, settle=args.settle)
        finally:
            if timm is not None:
                timm.close()
        runs = summarize(times, flops, peaks[prec])
        result["runs"][prec] = runs
        print(f"\n{prec}: peak {peaks[prec]:.0f} GFLOP/s, step {flops / 1e9:.1f} GFLOP")
        print(f"{'model':<22} {'best ms':>8} {'median ms':>10} {'img/s':>7} {'MFU':>6} {'ours faster by':>15} "
              f"{'(best-of)':>9}")
        for n, r in runs.items():
            print(f"{n:<22} {1e3 * r['step_s']:>8.1f} {1e3 * r['step_s_median']:>10.1f} {r['images_per_s']:>7.0f} "
                  f"{r['mfu']:>6.1%} {r['our_speedup_vs_this']:>14.2f}x {r['our_speedup_best_of']:>8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
