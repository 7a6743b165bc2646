"""``reproduce()``: expand, check data, run the unfinished runs, build tables, figures and the report.

What ``widesparse reproduce`` calls.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from widesparse.experiments.report import build_report
from widesparse.experiments.runner import check_data, expand, format_plan, run_sweep, write_plan

__all__ = ["reproduce"]


def reproduce(experiments: Sequence[str] | None = None, *, scale: str = "tiny", out: str | Path | None = None,
              dataset: str | None = None, data_dir: str | None = None, seeds: int | None = None,
              epochs: int | None = None, device: str | None = None, backend: str = "local", workers: int = 1,
              threads: int | None = None, address: str | None = None, plan_only: bool = False,
              keep_checkpoints: bool = False,
              command: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or with ``plan_only`` list) experiments at ``scale`` into ``out`` (default ``reproduce-<scale>``).

    Returns ``{"out", "plan", "sweep", "report"}``. Raises before starting anything on an unknown experiment,
    scale, data set or backend, and when an on-disk data set is missing.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out_dir = Path(out or f"reproduce-{scale}")
    points = expand(experiments, scale, dataset=dataset, seeds=seeds, data_dir=data_dir, epochs=epochs,
                    device=device)
    text = format_plan(points, out_dir)
    if plan_only:
        return {"out": str(out_dir), "plan": text, "sweep": None, "report": None}
    check_data(points)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plan(points, out_dir, {"scale": scale, "experiments": sorted({p.experiment for p in points}),
                                 "command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
    sweep = run_sweep(points, out_dir, backend=backend, workers=workers, threads=threads, address=address,
                      keep_checkpoints=keep_checkpoints, log=log)
    log(f"{sweep.total} runs: {sweep.cached} cached, {sweep.ran} ran, {len(sweep.failed)} failed in "
        f"{sweep.seconds:.1f} s; building the report")
    rep = build_report(out_dir)
    return {"out": str(out_dir), "plan": text, "sweep": sweep, "report": rep}
