"""Run every benchmark that applies to this machine and print one table of ratios against the peers.

Each ``bench_*.py`` runs in its own process (quick mode with ``--quick``) and writes its usual JSON; this
script measures the machine's own fp32 and bf16 GEMM peak (4096^3 products, best of N, the faster of torch.mm and
oneDNN: on AMD CPUs MKL's float32 torch.mm runs at half the oneDNN rate), collects every
benchmark's ratio against its peer with its target, and writes everything to
``benchmarks/results/<machine>-<date>.json`` (machine: a slug of the CPU model or GPU name). MFU is the
model-FLOP rate of a run over the measured peak of its precision. A peer that is not installed (the ``bench``
extra: mlp-mixer-pytorch, torch-cka, ckatorch, torch-structured) shows as "peer not installed".

    python benchmarks/run_all.py [--quick] [--only NAME[,NAME]] [--list] [--out PATH] [--timm-python PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
Row = dict[str, Any]


def machine_slug() -> str:
    """A short slug of the GPU name (if any) or the CPU model, e.g. ``intel-xeon-platinum-8375c``."""
    name = ""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        try:
            found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
            name = found.group(1) if found else ""
        except OSError:
            pass
        name = name or platform.processor() or platform.machine()
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b|\d+-core", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "unknown"


def gemm_peak(dtype: torch.dtype, device: str, n: int = 4096, reps: int = 5) -> float:
    """Best GFLOP/s of an ``n^3`` product in ``dtype`` over the routes of :func:`widesparse.ops.matmul.gemm_peaks`
    (``torch.mm``, and oneDNN on the CPU, which is twice MKL's float32 rate on AMD processors)."""
    from widesparse.ops.matmul import gemm_peaks

    return max(gemm_peaks(dtype, device, n=n, reps=reps).values())


# ------------------------------------------------------------------------------------- per-benchmark rows
def _row(name: str, ours: float | None, peer: float | None, target: float | None, unit: str = "s",
         note: str = "", mfu: float | None = None, higher_is_better: bool = True) -> Row:
    """``ratio`` = peer / ours for times (how many times faster we are), ours / peer for other quantities."""
    ratio = None if ours is None or peer is None or ours == 0 else peer / ours
    ok = None if ratio is None or target is None else (ratio >= target if higher_is_better else ratio <= target)
    return {"name": name, "ours": ours, "peer": peer, "ratio": ratio, "target": target, "pass": ok,
            "unit": unit, "mfu": mfu, "note": note}


def rows_mixer(res: dict, peaks: dict[str, float]) -> list[Row]:
    rows = []
    gflop = res["step_gflop"]
    for prec, runs in res["runs"].items():
        ours = runs["widesparse_mixer"]["step_s"]
        mfu = gflop / ours / peaks[prec]
        targets = {"lucidrains": 1.1 if prec == "fp32" else 1.15, "timm": 1.1 if prec == "fp32" else None}
        for peer, target in targets.items():
            p = runs.get(peer, {}).get("step_s")
            rows.append(_paired(_row(f"mixer {prec} vs {peer}", ours, p, target, mfu=mfu, note="" if p else
                                     "peer not installed" if peer == "lucidrains" else "no --timm-python"),
                                runs.get(peer, {}).get("our_speedup_vs_this")))
        rp = runs["widesparse_rp_mixer"]
        ratio = rp.get("our_speedup_vs_this")
        rows.append(_paired(_row(f"rp_mixer {prec} vs our mixer", rp["step_s"], ours, 0.9,
                                 mfu=gflop / rp["step_s"] / peaks[prec]), None if ratio is None else 1 / ratio))
    return rows


def _paired(row: Row, ratio: float | None) -> Row:
    """Use bench_mixer's median of per-round ratios (robust to load) instead of the ratio of the best steps."""
    if ratio is None or row["target"] is None:
        return row
    return {**row, "ratio": ratio, "pass": ratio >= row["target"]}


def rows_mixer_gpu(res: dict, peaks: dict[str, float]) -> list[Row]:
    runs, note = res["runs"], "" if "timm" in res["runs"] else res.get("timm", "")
    ours = runs["mixer"]["step_s"]
    return [_row("mixer-b16 gpu bf16 compiled vs timm", ours, runs.get("timm", {}).get("step_s"), 1.0,
                 mfu=runs["mixer"]["mfu"], note=note),
            _row("rp_mixer-b16 gpu bf16 vs our mixer", runs["rp_mixer"]["step_s"], ours, 0.9,
                 mfu=runs["rp_mixer"]["mfu"])]


def rows_sparse(res: dict, peaks: dict[str, float]) -> list[Row]:
    t = res.get("targets", {}).get("m4096_p1_64", {})
    rows = []
    for setting, ratio in t.get("time_ratio_by_setting", {}).items():
        r = _row(f"sparse m=4096 p=1/64 step, {setting} thr", t["sparse_step_ms_by_setting"][setting] / 1e3,
                 (t["masked_step_ms_by_setting"].get(setting) or 0) / 1e3 or None, 10.0, note="peer: MaskedLinear")
        r["ratio"] = ratio
        rows.append(r)
    if t.get("memory_ratio"):
        rows.append({**_row("sparse m=4096 p=1/64 peak memory", None, None, 20.0, unit="B", note="peer: MaskedLinear"),
                     "ratio": t["memory_ratio"], "pass": t["memory_ratio"] >= 20})
    return rows


def rows_cka(res: dict, peaks: dict[str, float]) -> list[Row]:
    med = res.get("median_seconds", {})
    note = "peer not installed" if "torch_cka" not in med else ""
    return [_row("cka float32 vs torch-cka", med.get("widesparse_f32"), med.get("torch_cka"), 5.0, note=note)]


def rows_monarch(res: dict, peaks: dict[str, float]) -> list[Row]:
    t = res.get("targets", {}).get("median", {})
    rows = []
    ts = t.get("torch_structured_over_ours_at_4096") or []
    rows.append({**_row("monarch n=4096 vs torch-structured", None, None, 1.0,
                        note="peer not installed" if not ts else ""), "ratio": ts[0] if ts else None,
                 "pass": (ts[0] >= 1.0) if ts else None})
    for key, ratio in (t.get("dense_over_ours_from_4096") or {}).items():
        rows.append({**_row(f"monarch {key} vs dense nn.Linear", None, None, 1.0), "ratio": ratio, "pass": ratio >= 1})
    return rows


def rows_train(res: dict, peaks: dict[str, float]) -> list[Row]:
    rows = []
    for wl, r in res.get("workloads", {}).items():
        share = r.get("best_overhead_share")
        rows.append({**_row(f"train engine overhead, {wl}", None, None, 0.05, unit="share",
                            note="peer: bare loop; ratio = overhead share", higher_is_better=False),
                     "ratio": share, "pass": None if share is None else share < 0.05})
    return rows


def rows_memory(res: dict, peaks: dict[str, float]) -> list[Row]:
    rows = []
    for name, c in res.get("configs", {}).items():
        ms = c["models"]
        if "step_seconds" in ms.get("rp_mixer", {}) and "step_seconds" in ms.get("mixer", {}):
            rows.append(_row(f"memory {name}: rp_mixer vs mixer step", ms["rp_mixer"]["step_seconds"],
                             ms["mixer"]["step_seconds"], 0.9))
        if "peak_bytes" in ms.get("sw_mlp_sparse", {}) and "peak_bytes" in ms.get("sw_mlp_masked", {}):
            rows.append({**_row(f"memory {name}: sw_mlp sparse vs masked peak", ms["sw_mlp_sparse"]["peak_bytes"],
                                ms["sw_mlp_masked"]["peak_bytes"], None, unit="B")})
    return rows


# name: (script, quick args, full args, devices it applies to, row extractor)
Extractor = Callable[[dict, dict[str, float]], list[Row]]
BENCHMARKS: dict[str, tuple[str, list[str], list[str], tuple[str, ...], Extractor]] = {
    "mixer": ("bench_mixer.py", ["--quick"], [], ("cpu",), rows_mixer),
    "mixer_gpu": ("bench_mixer_gpu.py", ["--rounds", "2", "--steps", "5"], [], ("cuda",), rows_mixer_gpu),
    "memory": ("bench_memory.py", ["--quick"], [], ("cpu", "cuda"), rows_memory),
    "sparse": ("bench_sparse.py", ["--quick"], [], ("cpu", "cuda"), rows_sparse),
    "monarch": ("bench_monarch.py", ["--quick"], [], ("cpu", "cuda"), rows_monarch),
    "cka": ("bench_cka.py", ["--quick"], [], ("cpu", "cuda"), rows_cka),
    "train": ("bench_train.py", ["--quick"], [], ("cpu", "cuda"), rows_train),
}


def run_one(name: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    script, qargs, fargs, _, _ = BENCHMARKS[name]
    out = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    cmd = [sys.executable, str(HERE / script), *(qargs if quick else fargs), *extra, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    info = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0, "returncode": res.returncode}
    if res.returncode != 0:
        return {**info, "error": res.stderr.strip()[-1500:]}
    return {**info, "json": str(out), "result": json.loads(out.read_text())}


def format_table(rows: list[Row]) -> str:
    head = f"{'benchmark':<44} {'ours':>10} {'peer':>10} {'ratio':>7} {'target':>7} {'pass':>5} {'MFU':>6}  note"
    lines = [head, "-" * len(head)]

    def num(v: float | None, unit: str) -> str:
        if v is None:
            return "-"
        return f"{v * 1e3:.1f}ms" if unit == "s" else f"{v / 2**20:.1f}MiB" if unit == "B" else f"{v:.3g}"

    for r in rows:
        ok = "-" if r["pass"] is None else "PASS" if r["pass"] else "FAIL"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        tgt = "-" if r["target"] is None else ("<" if r["unit"] == "share" else ">=") + f"{r['target']:g}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.0%}"
        lines.append(f"{r['name']:<44} {num(r['ours'], r['unit']):>10} {num(r['peer'], r['unit']):>10} {ratio:>7} "
                     f"{tgt:>7} {ok:>5} {mfu:>6}  {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark in its quick mode")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--list", action="store_true", help="list the benchmarks that apply here and exit")
    ap.add_argument("--out", default=None, help="combined JSON (default benchmarks/results/<machine>-<date>.json)")
    ap.add_argument("--timm-python", default=os.environ.get("WIDESPARSE_TIMM_PYTHON"),
                    help="interpreter of an environment with timm, for the Mixer comparison "
                         "(default: $WIDESPARSE_TIMM_PYTHON)")
    ap.add_argument("--gemm-reps", type=int, default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    applicable = [n for n, spec in BENCHMARKS.items() if ("cuda" if cuda else "cpu") in spec[3]]
    if args.list:
        for n in BENCHMARKS:
            print(f"{n:<10} {BENCHMARKS[n][0]:<20} {'' if n in applicable else '(not on this machine)'}")
        return 0
    names = applicable
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            print(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
    device = "cuda" if cuda else "cpu"
    reps = args.gemm_reps or (3 if args.quick else 5)
    from widesparse.ops.cpu_kernels import status as cpu_kernels_status

    peaks = {"fp32": gemm_peak(torch.float32, device, reps=reps), "bf16": gemm_peak(torch.bfloat16, device, reps=reps)}
    slug = machine_slug()
    report: dict[str, Any] = {"machine": slug, "date": dt.date.today().isoformat(), "device": device,
                              "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
                              "cpu_kernels": cpu_kernels_status(),
                              "loadavg_start": os.getloadavg(), "gemm_peak_gflops": peaks, "benchmarks": {},
                              "rows": []}
    print(f"{slug}: GEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    for name in names:
        extra = ["--timm-python", args.timm_python] if name == "mixer" and args.timm_python else []
        print(f"running {name} ...", file=sys.stderr, flush=True)
        run = run_one(name, args.quick, extra)
        report["benchmarks"][name] = {k: v for k, v in run.items() if k != "result"}
        if "error" in run:
            failed = {**_row(name, None, None, None), "note": "benchmark failed (see JSON)", "pass": False}
            report["rows"].append(failed)
            continue
        try:
            report["rows"].extend(BENCHMARKS[name][4](run["result"], peaks))
        except (KeyError, TypeError, ZeroDivisionError) as e:
            report["rows"].append({**_row(name, None, None, None), "note": f"unreadable result: {e!r}"})
    report["loadavg_end"] = os.getloadavg()
    table = format_table(report["rows"])
    print(table)
    out = Path(args.out) if args.out else RESULTS / f"{slug}-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
