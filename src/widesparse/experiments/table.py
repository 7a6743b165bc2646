"""The results table of a sweep: one row per point (CSV and JSON lines), and mean ± std over seeds.

Built from ``OUT/plan.json`` and the runs' ``result.json`` files only, so ``widesparse report OUT`` can
rebuild it at any time (also while a sweep is still running: unfinished runs are rows with ``status="todo"``).
A run whose ``result.json`` fails verification never stops the table: its rows have ``status="invalid"`` and an
``error`` naming the file and what is wrong (the next ``widesparse reproduce`` quarantines and reruns it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from widesparse.data.datasets import image_geometry
from widesparse.experiments.claims import sweep_lock
from widesparse.experiments.specs import forward_flops
from widesparse.experiments.tasks import ERROR, InvalidRun, verify
from widesparse.train.checkpoint import atomic_write

__all__ = ["COLUMNS", "METRICS", "load_rows", "write_table", "aggregate", "read_plan"]

COLUMNS = ("experiment", "series", "model", "dataset", "seed", "S", "C", "gamma", "L", "m", "gamma_m", "p", "omega",
           "omega_target", "connections", "params", "flops", "test_err", "test_acc", "train_acc", "diag_mean",
           "sigma_max", "mp_edge", "peak_bytes", "step_seconds", "flops_per_step", "wall_seconds", "status", "run_id",
           "kind")
METRICS = ("test_err", "test_acc", "train_acc", "diag_mean", "sigma_max", "peak_bytes", "step_seconds",
           "flops_per_step", "wall_seconds", "params", "flops")
_KEYS = ("experiment", "series", "model", "dataset", "S", "C", "gamma", "L", "m", "gamma_m", "p", "omega",
         "connections", "budget", "log2_S_over_C", "role", "patch")


def read_plan(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not the output folder of `widesparse reproduce`")
    return json.loads(path.read_text())


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


def _flops(row: dict[str, Any], params: dict[str, Any]) -> float | None:
    """Forward FLOPs per example: 2 x (mixing connections + patch embedding + head) (dense layers counted dense)."""
    cfg = params.get("config")
    if not cfg or row.get("connections") is None or row.get("m") is None:
        return None
    return forward_flops(row["connections"], row["m"], row.get("S") or 1, *image_geometry(cfg["dataset"]))


def _error_of(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("error"))
    except (OSError, ValueError, AttributeError) as e:
        return f"{path} cannot be read ({type(e).__name__}: {e})"


def load_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per point of the plan, with its run's result merged in (``status``: done, failed, invalid or
    todo)."""
    out = Path(out_dir)
    plan = read_plan(out)
    cache: dict[str, tuple[str, dict[str, Any]]] = {}
    rows = []
    for pt in plan["points"]:
        rid = pt["run_id"]
        if rid not in cache:
            run_dir = out / "runs" / rid
            try:
                rec = verify(run_dir)
            except InvalidRun as e:
                cache[rid] = ("invalid", {"error": str(e)})
                rec = None
            if rid in cache:
                pass
            elif rec is not None:
                cache[rid] = ("done", {**_scalars(rec["result"]), "wall_seconds": rec.get("wall_seconds")})
            elif (run_dir / ERROR).is_file():
                cache[rid] = ("failed", {"error": _error_of(run_dir / ERROR)})
            else:
                cache[rid] = ("todo", {})
        status, result = cache[rid]
        row = {**pt["meta"], "experiment": pt["experiment"], "run_id": rid, "kind": pt["kind"], "status": status,
               **result}
        if row.get("flops") is None:
            row["flops"] = _flops(row, pt["params"])
        rows.append(row)
    return rows


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items() if k in columns})
    return buf.getvalue()


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std (ddof 1; 0 for one seed) and count over seeds of every metric, per point without its seed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") != "done":
            continue
        key = tuple((k, r.get(k)) for k in _KEYS if k in r)
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        agg: dict[str, Any] = dict(key)
        agg["n"] = len(rs)
        for metric in METRICS:
            vals = [float(r[metric]) for r in rs if isinstance(r.get(metric), int | float)]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            agg[metric] = mean
            agg[f"{metric}_std"] = math.sqrt(var)
        out.append(agg)
    return out


def write_table(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write ``results.csv``, ``results.jsonl`` and ``aggregated.csv`` under ``out_dir``; return (rows, aggregated)."""
    out = Path(out_dir)
    rows = load_rows(out)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - {"error"})
    columns = [*COLUMNS, *extra, "error"]
    agg = aggregate(rows)
    agg_cols = list(dict.fromkeys(k for a in agg for k in a))
    with sweep_lock(out):
        atomic_write(out / "results.csv", lambda f: f.write(_csv(rows, columns)))
        atomic_write(out / "results.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows)))
        atomic_write(out / "aggregated.csv", lambda f: f.write(_csv(agg, agg_cols)))
    return rows, agg
