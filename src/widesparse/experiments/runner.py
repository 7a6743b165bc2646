"""Expand experiments into runs and execute the unfinished ones: locally (in-process or N workers) or on Ray.

``OUT/plan.json`` lists every point of the sweep; ``OUT/runs/<id>/result.json`` marks a finished run.
A rerun skips finished runs and resumes interrupted training runs from their checkpoints, so an interrupted
sweep loses at most the unfinished epochs of the runs in flight and repeats nothing. Several sweeps may share one
output folder: each run is executed under its claim (:mod:`widesparse.experiments.claims`); a sweep skips the
runs another live sweep holds and, before the next phase, waits for them (taking over any whose claim turns
stale), so every run is done exactly once. A run whose result fails verification is quarantined and run again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widesparse.budget import tokens_for_patch
from widesparse.data.datasets import image_geometry
from widesparse.experiments.catalog import get_experiment, list_experiments
from widesparse.experiments.claims import claim_status, sweep_lock
from widesparse.experiments.scales import get_scale
from widesparse.experiments.specs import KINDS, Point, Run, forward_flops
from widesparse.experiments.tasks import ERROR, execute, is_done
from widesparse.train.checkpoint import write_json

__all__ = ["BACKENDS", "SweepResult", "expand", "unique_runs", "check_data", "estimate", "format_plan",
           "run_sweep", "write_plan"]

BACKENDS = ("local", "ray")
_TRAIN_SIZES = {"digits": 1437, "mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000,
                "stl10": 5000, "svhn": 73257, "imagefolder": 1281167}


def expand(experiments: Sequence[str] | None, scale: str, *, dataset: str | None = None, seeds: int | None = None,
           data_dir: str | None = None, epochs: int | None = None, device: str | None = None) -> list[Point]:
    """All points of ``experiments`` (default: all) at ``scale`` with the user's overrides."""
    names = [get_experiment(e).id for e in experiments] if experiments else list_experiments()
    sc = get_scale(scale)
    points: list[Point] = []
    for name in dict.fromkeys(names):
        s = sc.settings(name, dataset=dataset, seeds=seeds, data_dir=data_dir, epochs=epochs, device=device)
        points += get_experiment(name).expand(s)
    return points


def unique_runs(points: Sequence[Point]) -> list[Run]:
    """Each run once, in execution order (kinds in :data:`KINDS` order; within a kind, first appearance)."""
    seen: dict[str, Run] = {}
    for p in points:
        seen.setdefault(p.run.id, p.run)
    return sorted(seen.values(), key=lambda r: KINDS.index(r.kind))


def _datasets(points: Sequence[Point]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in points:
        if p.run.kind == "train":
            c = p.run.params["config"]
            out[c["dataset"]] = c.get("data_dir")
    return out


def check_data(points: Sequence[Point]) -> None:
    """Before anything starts: every on-disk data set the runs need is present (else FileNotFoundError naming
    the data set, the missing files, where they were looked for and where to get them)."""
    from widesparse.data.datasets import get_dataset_info, missing_files

    problems = []
    for name, data_dir in _datasets(points).items():
        if name == "digits":
            continue
        info = get_dataset_info(name)
        if data_dir is None:
            problems.append(f"{name}: no --data-dir given; it must hold {', '.join(info.files)} ({info.source})")
            continue
        root = Path(data_dir).expanduser()
        missing = missing_files(name, root) if root.is_dir() else list(info.files)
        if missing:
            problems.append(f"{name}: missing {', '.join(missing)} under {root} (get them from {info.source})")
    if problems:
        raise FileNotFoundError("data sets missing; nothing was started:\n  " + "\n  ".join(problems))


def estimate(run: Run) -> dict[str, float]:
    """Coarse size of a training run from its model kwargs: parameters, forward FLOPs per example, total
    training FLOPs (3x forward per example per epoch) and peak memory (weights, grads, AdamW, activations)."""
    if run.kind != "train":
        return {"params": 0.0, "flops_per_example": 0.0, "train_flops": 0.0, "memory_bytes": 0.0}
    c = run.params["config"]
    kw, model = c["model_kwargs"], c["model"]
    img, chans, classes = image_geometry(c["dataset"])
    patch = kw.get("patch_size", 1)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    S = tokens_for_patch(img, patch)
    L = kw.get("depth", 1)
    if "width" in kw:  # SW-MLP / MLP
        m, g, p = kw["width"], kw.get("gamma", 2.0), kw.get("density", 1.0)
        C = m // S
        conn = 4 * L * p * g * m * m
        params = 4 * L * g * m * m if kw.get("backend") == "masked" or p == 1 else conn
        hidden = 2 * g * m
    elif model in ("monarch_mlp", "kron_mlp"):
        m, C = img * img * chans, img
        conn = params = 2 * L * img**3
        hidden = m
    else:
        C = kw["dim"]
        m = S * C
        gt, gc = kw.get("token_expansion", 2.0), kw.get("channel_expansion", 4.0)
        conn = 2 * L * m * (gt * S + gc * C)
        params = 2 * L * (gt * S * S + gc * C * C)
        hidden = (gt + gc) * m
    embed = m * chans * ph * pw + C * classes  # parameters of the patch embedding and the head
    fwd = forward_flops(conn, m, S, img, chans, classes)
    n = _TRAIN_SIZES.get(c["dataset"], 50000)
    acts = 4.0 * c["batch_size"] * L * (4 * m + 2 * hidden)
    return {"params": float(params + embed), "flops_per_example": fwd, "train_flops": 3 * fwd * n * c["epochs"],
            "memory_bytes": 16.0 * (params + embed) + acts}


def _human(x: float, unit: str = "") -> str:
    for k, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= k:
            return f"{x / k:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".strip()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h"


def format_plan(points: Sequence[Point], out_dir: str | Path | None = None) -> str:
    """The dry run: one line per run (experiment, kind, model, sizes, estimates, cached?) and the totals."""
    runs = unique_runs(points)
    used: dict[str, list[str]] = {}
    for p in points:
        used.setdefault(p.run.id, [])
        if p.experiment not in used[p.run.id]:
            used[p.run.id].append(p.experiment)
    meta = {p.run.id: p.meta for p in points}
    lines = [f"{'run':<34} {'exps':<8} {'data':<9} {'S':>4} {'C':>5} {'L':>3} {'m':>7} {'p':>8} {'params':>8} "
             f"{'train FLOPs':>11} {'memory':>9}  state"]
    tot_flops = tot_mem = 0.0
    done = 0
    for r in runs:
        e, mt = estimate(r), meta[r.id]
        state = "done" if out_dir is not None and is_done(Path(out_dir) / "runs" / r.id) else "todo"
        done += state == "done"
        tot_flops += e["train_flops"]
        tot_mem = max(tot_mem, e["memory_bytes"])
        ds = r.params.get("config", r.params).get("dataset", "-")
        p = mt.get("p")
        lines.append(
            f"{r.id:<34} {','.join(used[r.id]):<8} {ds or '-':<9} {mt.get('S', ''):>4} {mt.get('C', ''):>5} "
            f"{mt.get('L', ''):>3} {mt.get('m', ''):>7} {(f'{p:.4g}' if p is not None else ''):>8} "
            f"{_human(e['params']):>8} {_human(e['train_flops']):>11} {_human(e['memory_bytes'], 'B'):>9}  {state}"
        )
    kinds = {k: sum(r.kind == k for r in runs) for k in KINDS}
    lines.append(
        f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in kinds.items() if v)}), {done} already done; "
        f"{len(points)} points; estimated training compute {_human(tot_flops, 'FLOP')}: about "
        f"{_duration(tot_flops / 5e10)} at 50 GFLOP/s (2 CPU cores) or {tot_flops / 1e14 / 3600:.3g} GPU-hours at "
        f"100 TFLOP/s effective; largest run about {_human(tot_mem, 'B')} of memory"
    )
    return "\n".join(lines)


def write_plan(points: Sequence[Point], out_dir: Path, info: dict[str, Any]) -> None:
    rows = [{"experiment": p.experiment, "run_id": p.run.id, "kind": p.run.kind, "params": p.run.params,
             "needs": list(p.run.needs), "meta": p.meta} for p in points]
    with sweep_lock(out_dir):
        write_json(out_dir / "plan.json", {**info, "points": rows})


@dataclass
class SweepResult:
    total: int = 0
    cached: int = 0
    ran: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _payload(r: Run) -> dict[str, Any]:
    return {"id": r.id, "kind": r.kind, "params": r.params}


def _threads(workers: int, threads: int | None) -> int | None:
    if threads is not None:
        return threads
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


def _local(batch: list[Run], out: str, workers: int, threads: int | None, done: Callable[[dict], None],
           keep: bool) -> None:
    t = _threads(workers, threads)
    if workers <= 1:
        for r in batch:
            done(execute(_payload(r), out, t, keep))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(execute, _payload(r), out, t, keep) for r in batch]
        for f in as_completed(futs):
            done(f.result())


def _ray(batch: list[Run], out: str, workers: int, threads: int | None, done: Callable[[dict], None],
         address: str | None, gpus: float, keep: bool) -> None:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--backend ray needs Ray: pip install 'widesparse[ray]'") from e
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": address} if address else {"num_cpus": max(1, workers) * (threads or 1)}
        ray.init(include_dashboard=False, log_to_driver=False, **kw)
    remote = ray.remote(num_cpus=threads or 1, num_gpus=gpus)(execute)
    pending = [remote.remote(_payload(r), out, threads or 1, keep) for r in batch]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done(ray.get(ready[0]))


def _wait_for_held(held: list[Run], out: Path, poll: float, log: Callable[[str], None]) -> list[Run]:
    """Poll the runs another live sweep holds until each is done (dropped), failed by its holder (returned with
    ``failed`` info via the log), or free/stale again (returned: this sweep executes it, taking a stale claim)."""
    if held:
        log(f"waiting for {len(held)} runs another sweep is executing: {', '.join(r.id for r in held)}")
    again: list[Run] = []
    pending = list(held)
    while pending:
        still = []
        for r in pending:
            run_dir = out / "runs" / r.id
            if is_done(run_dir):
                continue
            if claim_status(run_dir).state == "held":
                still.append(r)
            else:
                again.append(r)
        pending = still
        if pending:
            time.sleep(poll)
    return again


def run_sweep(points: Sequence[Point], out_dir: str | Path, *, backend: str = "local", workers: int = 1,
              threads: int | None = None, address: str | None = None, gpus_per_run: float | None = None,
              keep_checkpoints: bool = False, log: Callable[[str], None] | None = None,
              poll: float = 2.0) -> SweepResult:
    """Execute every unfinished run of ``points`` under ``out_dir`` (phases in :data:`KINDS` order).

    Runs held by another live sweep are skipped, then waited for (every ``poll`` seconds) before the next phase;
    a run that other sweep left unfinished (failed, or its claim went stale) is executed here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out_dir)
    runs = unique_runs(points)
    res = SweepResult(total=len(runs))
    t0 = time.perf_counter()
    exps: dict[str, list[str]] = {}
    for p in points:
        exps.setdefault(p.run.id, []).append(p.experiment)
    todo = [r for r in runs if not is_done(out / "runs" / r.id)]
    res.cached = len(runs) - len(todo)
    counter = [res.cached]
    held: list[Run] = []
    by_id = {r.id: r for r in runs}

    def done(info: dict[str, Any]) -> None:
        if info.get("busy"):
            held.append(by_id[info["id"]])
            return
        counter[0] += 1
        where = ",".join(dict.fromkeys(exps.get(info["id"], [])))
        if info["ok"]:
            res.ran += not info.get("cached")
            how = "done by another sweep" if info.get("elsewhere") else f"done in {info['seconds']:.1f} s"
            log(f"[{counter[0]}/{len(runs)}] {info['id']} ({where}) {how}")
        else:
            res.failed.append(info)
            log(f"[{counter[0]}/{len(runs)}] {info['id']} ({where}) FAILED: {info['error']}")

    def execute_batch(batch: list[Run]) -> None:
        if backend == "local":
            _local(batch, str(out), workers, threads, done, keep_checkpoints)
        else:
            gpus = gpus_per_run if gpus_per_run is not None else _default_gpus(batch)
            _ray(batch, str(out), workers, threads, done, address, gpus, keep_checkpoints)

    if res.cached:
        log(f"{res.cached} of {len(runs)} runs already done in {out}; running the other {len(todo)}")
    failed_ids: set[str] = set()
    for kind in KINDS:
        batch = [r for r in todo if r.kind == kind]
        ready = [r for r in batch if not failed_ids.intersection(r.needs)]
        for r in batch:
            if r not in ready:
                done({"id": r.id, "ok": False, "error": "a run it needs failed", "seconds": 0.0})
        while ready:
            held.clear()
            execute_batch(ready)
            waited, ready = list(held), []
            for r in _wait_for_held(waited, out, poll, log):
                if (out / "runs" / r.id / ERROR).is_file() and claim_status(out / "runs" / r.id).state == "free":
                    err = json.loads((out / "runs" / r.id / ERROR).read_text()).get("error")
                    done({"id": r.id, "ok": False, "error": f"failed in another sweep: {err}", "seconds": 0.0})
                else:
                    ready.append(r)  # left unfinished by a holder that is gone: ours now
            for r in waited:
                if r not in ready and is_done(out / "runs" / r.id):
                    done({"id": r.id, "ok": True, "cached": True, "elsewhere": True, "seconds": 0.0})
        failed_ids = {f["id"] for f in res.failed}
    res.seconds = time.perf_counter() - t0
    return res


def _default_gpus(batch: list[Run]) -> float:
    """One GPU per training run when its config asks for CUDA, else none."""
    dev = [r.params.get("config", r.params).get("device", "cpu") for r in batch]
    return 1.0 if any(str(d).startswith("cuda") for d in dev) else 0.0
