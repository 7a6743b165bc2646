"""Mixer training-step speed of two revisions of this repository, measured in one run, interleaved.

A restructure should not move the Mixer's speed, but the shared machine's load swings move the absolute step
times by more than the effect to detect, so a number from another day cannot serve as "before". This script
checks out both revisions (``git worktree add --detach`` into a temp dir; ``WORKTREE`` means this checkout as
it is, uncommitted changes included), builds each one's C++ CPU kernels once in its own
``TORCH_EXTENSIONS_DIR`` (an untimed warm-up run), then runs each revision's OWN ``benchmarks/bench_mixer.py``
in rounds that alternate the order (A, B, then B, A, ...), so load hits both alike. Per revision and precision
it reports the median (and min/max) over rounds of ours vs lucidrains, RP-Mixer vs ours and the step times,
and after/before for each: "every ratio within 3% of before" reads straight off the last column.

    python benchmarks/compare_commits.py BEFORE AFTER [--rounds 5] [--precision fp32,bf16] [--reps 3]
        [--threads N] [--timm-python PATH] [--out benchmarks/results/compare-<before>-<after>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
# table rows (key, label, unit): ratios in "times", step times the bench's per-run median; MFU etc. in the JSON
METRICS = [("ours_vs_lucidrains", "ours vs lucidrains", "x"), ("ours_vs_timm", "ours vs timm", "x"),
           ("rp_vs_ours", "RP vs ours", "x"), ("ours_step_ms", "ours step ms", "ms"),
           ("rp_step_ms", "RP step ms", "ms")]


class Failure(Exception):
    """A revision that does not resolve, or a bench_mixer.py run that fails: message for the user."""


def git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def resolve(rev: str) -> dict:
    """Commit hash, short name and dirty flag of a revision (WORKTREE: HEAD of this checkout plus its changes)."""
    if rev == WORKTREE:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"rev": rev, "commit": git("rev-parse", "HEAD"), "short": "worktree", "dirty": dirty}
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"revision {rev!r} does not exist in {ROOT}")
    commit = r.stdout.strip()
    return {"rev": rev, "commit": commit, "short": git("rev-parse", "--short", commit), "dirty": False}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_bench(side: dict, tmp: Path, name: str, bench_args: list[str]) -> dict:
    """Run the revision's own bench_mixer.py once; its parsed JSON, or Failure with its stderr tail."""
    out = tmp / f"{side['label']}-{name}.json"
    cmd = [sys.executable, str(side["tree"] / "benchmarks" / "bench_mixer.py"), *bench_args, "--out", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=side["tree"], env=side["env"], capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-30:])
        raise Failure(f"bench_mixer.py of {side['label']} ({side['rev']}) failed with exit {r.returncode}:\n"
                      f"  {' '.join(cmd)}\n--- stderr tail ---\n{tail}")
    print(f"  {name:<8} {side['label']:<6} {side['short']:<9} {time.perf_counter() - t:6.1f} s", flush=True)
    return json.loads(out.read_text())


def extract(result: dict, prec: str) -> dict[str, float]:
    """This comparison's metrics from one bench_mixer.py JSON (fields of runs[prec][model])."""
    runs = result["runs"][prec]
    ours, rp = runs["widesparse_mixer"], runs["widesparse_rp_mixer"]
    m = {"rp_vs_ours": 1 / rp["our_speedup_vs_this"], "ours_step_ms": 1e3 * ours["step_s_median"],
         "rp_step_ms": 1e3 * rp["step_s_median"], "ours_best_step_ms": 1e3 * ours["step_s"],
         "rp_best_step_ms": 1e3 * rp["step_s"], "ours_mfu": ours.get("mfu"), "rp_mfu": rp.get("mfu")}
    for peer in ("lucidrains", "timm"):
        if peer in runs:
            m[f"ours_vs_{peer}"] = runs[peer]["our_speedup_vs_this"]
            m[f"{peer}_step_ms"] = 1e3 * runs[peer]["step_s_median"]
    return {k: v for k, v in m.items() if v is not None}


def aggregate(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for r in rounds for k in r})
    vals = {k: [r[k] for r in rounds if k in r] for k in keys}
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in vals.items()}


def cell(agg: dict | None, unit: str) -> str:
    if agg is None:
        return "n/a"
    fmt = {"x": "{:.3f}x", "ms": "{:.1f}"}[unit]
    s = fmt.format(agg["median"])
    return s if agg["n"] == 1 else f"{s} ({fmt.format(agg['min'])}-{fmt.format(agg['max'])})"


def table(sides: list[dict], precisions: list[str], medians: dict) -> tuple[str, float]:
    """Markdown table (median over rounds, min-max in brackets) and the largest |after/before - 1| of a ratio."""
    b, a = sides
    lines = [f"| precision | metric | before {b['short']} | after {a['short']} | after/before |",
             "|---|---|---|---|---|"]
    worst = 0.0
    for prec in precisions:
        for key, label, unit in METRICS:
            mb, ma = medians[b["label"]][prec].get(key), medians[a["label"]][prec].get(key)
            if mb is None and ma is None:
                continue
            q = ma["median"] / mb["median"] if mb and ma else None
            if q is not None and unit == "x":
                worst = max(worst, abs(q - 1))
            lines.append(f"| {prec} | {label} | {cell(mb, unit)} | {cell(ma, unit)} | "
                         f"{'n/a' if q is None else f'{q:.3f}'} |")
    return "\n".join(lines), worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="git revision, or WORKTREE for this checkout with its uncommitted changes")
    ap.add_argument("after", help="git revision, or WORKTREE")
    ap.add_argument("--rounds", type=int, default=5, help="bench_mixer.py runs per revision, order alternating")
    ap.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both, comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="bench_mixer.py --reps of each run (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="bench_mixer.py --threads (default: its own, 2)")
    ap.add_argument("--timm-python", default=None, help="passed to bench_mixer.py (timm in another interpreter)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compare-<b>-<a>.json)")
    args = ap.parse_args(argv)
    precisions = args.precision.split(",")
    if bad := [p for p in precisions if p not in ("fp32", "bf16")]:
        ap.error(f"--precision: unknown {', '.join(map(repr, bad))}; valid: fp32, bf16")
    if args.rounds < 1 or args.reps < 1:
        ap.error("--rounds and --reps must be at least 1")
    extra = [*(["--threads", str(args.threads)] if args.threads is not None else []),
             *(["--timm-python", args.timm_python] if args.timm_python else [])]
    tmp = Path(tempfile.mkdtemp(prefix="compare-commits-"))
    sides: list[dict] = []
    try:
        for label, rev in (("before", args.before), ("after", args.after)):
            side = {"label": label, **resolve(rev)}
            if rev == WORKTREE:
                side["tree"] = ROOT
            else:
                side["tree"] = tmp / label
                git("worktree", "add", "--detach", str(side["tree"]), side["commit"])
                side["worktree_added"] = True
            sides.append(side)
            if not (side["tree"] / "benchmarks" / "bench_mixer.py").exists():
                raise Failure(f"{rev} ({side['short']}) has no benchmarks/bench_mixer.py")
            src = str(side["tree"] / "src")
            side["env"] = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp / f"ext-{label}"),
                           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
            where = subprocess.run([sys.executable, "-c", "import widesparse; print(widesparse.__file__)"],
                                   env=side["env"], capture_output=True, text=True)
            if where.returncode != 0 or not where.stdout.strip().startswith(src):
                raise Failure(f"{label}: widesparse does not import from {src}: {where.stdout}{where.stderr}")
        load_start = os.getloadavg()
        print(f"warm-up (builds each revision's CPU kernels in its own TORCH_EXTENSIONS_DIR under {tmp})")
        for side in sides:
            run_bench(side, tmp, "warmup", ["--reps", "1", "--precision", precisions[0], *extra])
        raw: dict = {s["label"]: [] for s in sides}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                res = run_bench(side, tmp, f"round{rnd + 1}",
                                ["--reps", str(args.reps), "--precision", args.precision, *extra])
                try:
                    metrics = {p: extract(res, p) for p in precisions}
                except KeyError as e:
                    raise Failure(f"bench_mixer.py of {side['rev']} wrote JSON without the field {e}") from e
                raw[side["label"]].append({"round": rnd + 1, "metrics": metrics,
                                           "cpu_kernels": res.get("cpu_kernels"), "threads": res.get("threads"),
                                           "torch": res.get("torch"),
                                           "matmul_peak_gflops": res.get("matmul_peak_gflops"),
                                           "matmul_peak_by_route": res.get("matmul_peak_by_route"),
                                           "timm": res.get("timm")})
    except Failure as e:
        print(f"compare_commits: {e}", file=sys.stderr)
        return 1
    finally:
        for side in sides:
            if side.get("worktree_added"):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(side["tree"])],
                               capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {label: {p: aggregate([r["metrics"][p] for r in rs]) for p in precisions} for label, rs in raw.items()}
    peaks = {label: {p: aggregate([{"gflops": r["matmul_peak_gflops"][p]} for r in rs
                                   if r.get("matmul_peak_gflops")]).get("gflops") for p in precisions}
             for label, rs in raw.items()}
    text, worst = table(sides, precisions, medians)
    first = raw[sides[0]["label"]][0]
    load_end = os.getloadavg()
    print(f"\n{cpu_model()}, torch {first['torch']}, {first['threads']} threads, rounds: {args.rounds} x "
          f"bench_mixer --reps {args.reps}, load average {load_start[0]:.1f} -> {load_end[0]:.1f}; "
          f"median over rounds (min-max)\n")
    print(text)
    print(f"\nlargest ratio change after/before: {worst:.1%}")
    for side in sides:
        pk = ", ".join(f"{p} {v['median']:.0f}" for p, v in peaks[side["label"]].items() if v)
        print(f"{side['label']}: {side['rev']} = {side['commit'][:12]}{' + uncommitted changes' * side['dirty']}, "
              f"cpu_kernels {raw[side['label']][0]['cpu_kernels']}, matmul peak GFLOP/s (median) {pk}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"compare-{sides[0]['short']}-{sides[1]['short']}.json")
    doc = {"cpu": cpu_model(), "torch": first["torch"], "threads": first["threads"], "rounds": args.rounds,
           "reps": args.reps, "precisions": precisions, "timm_python": args.timm_python,
           "loadavg_start": load_start, "loadavg_end": load_end,
           "revisions": {s["label"]: {k: s[k] for k in ("rev", "commit", "short", "dirty")} for s in sides},
           "medians": medians, "matmul_peak_gflops": peaks, "max_abs_ratio_change": worst, "raw": raw}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
