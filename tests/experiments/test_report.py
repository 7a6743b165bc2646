"""Tables, verdicts, figures and the report, built from small hand-written result folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from widesparse.experiments.findings import judge
from widesparse.experiments.report import build_report, table1_configs
from widesparse.experiments.table import aggregate, load_rows

pytestmark = pytest.mark.usefixtures("single_thread")


def _folder(tmp_path, points):
    """``points``: (experiment, kind, meta, result or None); writes plan.json and the runs' result.json."""
    plan = []
    for i, (exp, kind, meta, result) in enumerate(points):
        rid = f"{kind}-x-{i:04d}"
        plan.append({"experiment": exp, "run_id": rid, "kind": kind, "params": {}, "needs": [], "meta": meta})
        if result is not None:
            d = tmp_path / "runs" / rid
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps({"id": rid, "kind": kind, "result": result,
                                                       "wall_seconds": 1.0}))
            if kind == "cka":
                np.save(d / "cka.npy", np.full((4, 4), result["diag_mean"]))
    (tmp_path / "plan.json").write_text(json.dumps({"scale": "tiny", "command": "test", "points": plan}))
    return tmp_path


def _e7(valley: bool):
    pts = []
    for series in ("mixer", "rp_mixer"):
        for x in (-3.0, -1.5, 0.0, 1.5, 3.0):
            for seed in (0, 1):
                err = (0.05 + 0.02 * abs(x) if valley else 0.05 + 0.02 * (x + 3)) + 0.001 * seed
                meta = {"series": series, "dataset": "digits", "seed": seed, "log2_S_over_C": x, "S": 2 ** (3 + x),
                        "C": 8, "m": 8 * 2 ** (3 + x)}
                pts.append(("E7", "train", meta, {"test_err": err, "train_acc": 1.0}))
    return pts


def test_e7_verdict_follows_the_numbers(tmp_path):
    rows = load_rows(_folder(tmp_path / "a", _e7(True)))
    assert judge("E7", rows).status == "agrees"
    rows = load_rows(_folder(tmp_path / "b", _e7(False)))
    v = judge("E7", rows)
    assert v.status == "disagrees" and "log2(S/C) = -3.00" in v.ours


def test_aggregate_mean_and_std_over_seeds(tmp_path):
    rows = load_rows(_folder(tmp_path, _e7(True)))
    agg = [a for a in aggregate(rows) if a["series"] == "mixer" and a["log2_S_over_C"] == 0.0]
    assert len(agg) == 1 and agg[0]["n"] == 2
    assert agg[0]["test_err"] == pytest.approx(0.0505)
    assert agg[0]["test_err_std"] == pytest.approx(0.001 / math.sqrt(2))


def test_missing_runs_make_a_verdict_incomplete_and_rows_todo(tmp_path):
    pts = _e7(True)
    pts[0] = (pts[0][0], pts[0][1], pts[0][2], None)
    rows = load_rows(_folder(tmp_path, pts))
    assert rows[0]["status"] == "todo"
    assert "1 of 20 points missing" in judge("E7", rows).ours
    assert judge("E3", rows).status == "incomplete"


def test_e1_e3_e8_verdicts(tmp_path):
    pts = []
    for p in (1, 1 / 4, 1 / 16, 1 / 64):
        for seed in (0, 1):
            d = 0.6 - 0.1 * abs(math.log2(p * 16)) / 2 + 0.001 * seed
            pts.append(("E1", "cka", {"role": "cka", "series": "S=C=16", "p": p, "C": 16, "m": 256, "seed": seed},
                        {"diag_mean": d}))
    for m in (64, 256, 1024):
        pts.append(("E3", "spectra", {"series": "mixer", "m": m, "seed": 0}, {"sigma_max": 2.39, "mp_edge": 2.414}))
        pts.append(("E3", "spectra", {"series": "sw_mlp", "m": m, "seed": 0},
                    {"sigma_max": 2.4 + 0.1 * math.log2(m), "mp_edge": 2.414}))
    for L in (2, 4, 8):
        pts.append(("E8", "train", {"series": "mixer", "L": L, "seed": 0}, {"test_err": 0.10}))
        pts.append(("E8", "train", {"series": "rp_mixer", "L": L, "seed": 0}, {"test_err": 0.10 + 0.02 * (L == 2)}))
    out = _folder(tmp_path, pts)
    rows = load_rows(out)
    assert judge("E1", rows).status == "agrees"
    assert judge("E3", rows).status == "agrees"
    assert judge("E8", rows).status == "agrees"
    rep = build_report(out)
    md = (out / "report.md").read_text()
    assert "| E1 |" in md and "**agrees**" in md and "figures/E1.png" in md
    assert (out / "figures" / "E1_heatmaps.png").is_file() and (out / "figures" / "E3.svg").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "<table>" in html
    assert set(rep["verdicts"]) == {"E1", "E3", "E8"}
    assert (out / "results.csv").read_text().splitlines()[0].startswith("experiment,series,model")


def test_table1_configurations_and_their_connections(tmp_path):
    cfg = {c["model"]: c for c in table1_configs()}
    b16, bw = cfg["Mixer-B/16"], cfg["Mixer-B-W"]
    assert b16["m"] == bw["m"] == 150_528
    assert b16["connections"] == bw["connections"] == 4 * 12 * 260_112_384
    assert bw["p"] < b16["p"]
    ss, ssw = cfg["Mixer-SS/8"], cfg["Mixer-SS-W"]
    assert ss["S"] == 16 and ssw["S"] == 64 and ssw["m"] > ss["m"]
    assert ss["connections"] == pytest.approx(2**28, rel=2e-3) and ssw["connections"] == pytest.approx(2**28, rel=2e-3)
    pts = [("E9", "train", {"series": s, "S": S, "seed": k}, {"test_err": e + 0.002 * k})
           for s, S, e in (("narrow", 4, 0.10), ("wide", 16, 0.06)) for k in (0, 1)]
    out = _folder(tmp_path, pts)
    build_report(out)
    md = (out / "report.md").read_text()
    assert "Mixer-SS-W" in md and "150,528" in md and "12,485,394,432" in md
    assert judge("E9", load_rows(out)).status == "agrees"
