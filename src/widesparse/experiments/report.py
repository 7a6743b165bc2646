"""``report.md`` and a standalone ``report.html``: per experiment the paper's finding beside ours, and a verdict.

:func:`build_report` reads only the output folder (plan + run results), so ``widesparse report OUT``
rebuilds tables, figures and report at any time. The HTML embeds its figures (base64 PNG): one file to send.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from widesparse import budget
from widesparse.experiments import figures
from widesparse.experiments.catalog import get_experiment
from widesparse.experiments.claims import sweep_lock
from widesparse.experiments.findings import Verdict, judge
from widesparse.experiments.table import read_plan, write_table
from widesparse.train.checkpoint import atomic_write

__all__ = ["build_report", "table1_configs", "summary_table"]

Block = tuple[Any, ...]
_COLS = {
    "E1": ("series", "p", "m", "diag_mean", "n"),
    "E2": ("series", "S", "C", "m", "gamma_m", "p", "test_err", "n"),
    "E3": ("series", "m", "p", "sigma_max", "n"),
    "E4": ("series", "test_err", "train_acc", "n"),
    "E5": ("budget", "series", "S", "C", "m", "test_err", "n"),
    "E6": ("gamma", "S", "C", "gamma_m", "test_err", "train_acc", "n"),
    "E7": ("dataset", "series", "S", "C", "log2_S_over_C", "m", "test_err", "n"),
    "E8": ("series", "L", "test_err", "train_acc", "n"),
    "E9": ("series", "S", "C", "m", "connections", "test_err", "n"),
    "E10": ("series", "m", "params", "peak_bytes", "step_seconds", "flops_per_step", "n"),
}


def table1_configs() -> list[dict[str, Any]]:
    """Table 1's configurations with their connection counts (docs/theory.md E9); the SS models are our reconstruction
    from the ``paper`` scale's E9 settings (Ω, γ, depth, token counts on 32x32 images)."""
    from widesparse.experiments.scales import SCALES

    e9 = SCALES["paper"].experiments["E9"]
    g, L = e9["gamma"], e9["depth"]
    ss = []
    pairs = (("Mixer-SS/8", e9["narrow_tokens"], "patch 8"), ("Mixer-SS-W", e9["wide_tokens"], "patch 4"))
    for name, S, patch in pairs:
        C = round(budget.solve_channels(e9["omega"], g, S))
        ss.append((name, S, C, round(g * S), round(g * C), L, f"ours: {patch} on 32², γ = {g:g}, C solved from Ω"))
    rows = []
    for name, S, C, ds, dc, L, note in (
        ("Mixer-B/16", 196, 768, 384, 3072, 12, "Tolstikhin et al. (patch 16 on 224²)"),
        ("Mixer-B-W", 256, 588, 384, 3072, 12, "patch 14 on 224²; D_S, D_C as B/16 (our preset mixer_b_w)"),
        *ss,
    ):
        omega = budget.mixer_omega(S, C, ds, dc)
        rows.append({"model": name, "S": S, "C": C, "D_S": ds, "D_C": dc, "L": L, "m": S * C,
                     "p": budget.density(S, C), "omega": omega, "connections": 4 * L * omega, "note": note})
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.4e}"
    return "" if v is None else str(v)


def _agg_table(exp: str, agg: Sequence[dict[str, Any]]) -> Block:
    cols = [c for c in _COLS[exp] if any(c in a for a in agg)]
    rows = []
    for a in agg:
        r = []
        for c in cols:
            v = a.get(c)
            if c in ("test_err", "train_acc") and v is not None:
                r.append(f"{100 * v:.2f} ± {100 * a.get(c + '_std', 0):.2f}")
            elif c == "peak_bytes" and v is not None:
                r.append(f"{v / 2**20:.1f} MiB")
            elif c == "diag_mean" and v is not None:
                r.append(f"{v:.3f} ± {a.get('diag_mean_std', 0):.3f}")
            else:
                r.append(_fmt(v))
        rows.append(r)
    sort_cols = [i for i, c in enumerate(cols) if c in ("budget", "dataset", "series")]
    rows.sort(key=lambda r: tuple(r[i] for i in sort_cols))
    return ("table", [c.replace("_", " ") for c in cols], rows)


def summary_table(verdicts: dict[str, Verdict]) -> Block:
    rows = [[e, get_experiment(e).finding, v.ours, f"**{v.status}**"] for e, v in verdicts.items()]
    return ("table", ["exp", "paper's finding", "ours", "verdict"], rows)


def _e9_blocks() -> list[Block]:
    cfg = table1_configs()
    rows = [[c["model"], c["S"], c["C"], c["D_S"], c["D_C"], c["L"], c["m"], f"{c['p']:.6f}", f"{c['omega']:,.0f}",
             f"{c['connections']:,.0f}", c["note"]] for c in cfg]
    b16, bw = cfg[0], cfg[1]
    return [
        ("h3", "Table 1 configurations and the equal-connection pairing"),
        ("table", ["model", "S", "C", "D_S", "D_C", "L", "m = SC", "p", "Ω per layer (10)", "total 4LΩ", "note"],
         rows),
        ("p", f"Derivation: Ω = γ m (S + C)/2 = p γ m² (10). Mixer-B/16 and Mixer-B-W have the same m = "
              f"{b16['m']:,} (196·768 = 256·588) but S + C drops from 964 to 844, so p falls from "
              f"{b16['p']:.6f} to {bw['p']:.6f}; at equal Ω this frees a factor (964/844) = {964 / 844:.3f} for γm. "
              f"With the paper's B/16 hidden widths kept, Ω is {b16['omega']:,.0f} vs {bw['omega']:,.0f}. The paper's "
              "CIFAR numbers (error %): Mixer-SS/8 15.91 / 44.24, β-LASSO (cited) 14.81 / 40.44, Mixer-SS-W 12.07 ± "
              "0.47 / 38.13; ImageNet Mixer-B/16 23.56, Mixer-B-W 23.26 ± 0.19."),
    ]


def _e10_blocks() -> list[Block]:
    try:
        from widesparse.analysis.profiling import masked_sw_mlp_memory
    except ImportError:
        return [("p", "The analytic extrapolation needs widesparse.analysis.profiling (not available in this build).")]
    est = masked_sw_mlp_memory(196, 768, 384, 3072, 12)
    rows: list[list[str]] = []

    def add(key: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                add(f"{key} / {k}", sub)
        elif isinstance(v, int | float) and "bytes" in key and "dtype" not in key:
            rows.append([key.replace("_", " "), f"{v:,.0f} B = {v / 1e12:.4g} TB = {v / 1e6:.4g} MB"])
        elif isinstance(v, float):
            rows.append([key.replace("_", " "), f"{v:.4g}"])
        else:
            rows.append([key.replace("_", " "), f"{v:,}" if isinstance(v, int) else str(v)])

    for k, v in est.items():
        add(k, v)
    return [("h3", "Extrapolation to Mixer-B/16 (analytic, widesparse.analysis.profiling.masked_sw_mlp_memory)"),
            ("table", ["quantity", "value"], rows),
            ("p", "'paper comparison' rows are our figure divided by the paper's (23.2 TB for the masked SW-MLP, "
                  "26.3 MB for the Mixer), in decimal and binary units: 1.0 would be an exact match.")]


def _render_md(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            out.append("#" * int(b[0][1]) + " " + b[1])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "list":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif b[0] == "table":
            cells = [[str(c).replace("|", "\\|") for c in row] for row in b[2]]
            out.append("\n".join(["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                                 + ["| " + " | ".join(r) + " |" for r in cells]))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _render_html(blocks: Sequence[Block], root: Path, title: str) -> str:
    esc = html.escape
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            body.append(f"<{b[0]}>{esc(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{esc(b[1])}</p>")
        elif b[0] == "list":
            body.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c)).replace('**', '')}</td>" for c in r) + "</tr>"
                           for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            data = base64.b64encode((root / b[1]).read_bytes()).decode()
            body.append(f'<img alt="{esc(b[2])}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}table{border-collapse:"
             "collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def build_report(out_dir: str | Path, log: Any = None) -> dict[str, Any]:
    """Write results tables, figures, ``report.md`` and ``report.html`` in ``out_dir``; return the verdicts."""
    out = Path(out_dir)
    plan = read_plan(out)
    rows, agg = write_table(out)
    exps = list(dict.fromkeys(r["experiment"] for r in rows))
    verdicts = {e: judge(e, rows) for e in exps}
    status = {s: sum(r["status"] == s for r in {r["run_id"]: r for r in rows}.values())
              for s in ("done", "failed", "invalid", "todo")}
    invalid = sorted({r["run_id"] + ": " + str(r.get("error")) for r in rows if r["status"] == "invalid"})
    title = f"widesparse reproduce --scale {plan.get('scale')}: report"
    blocks: list[Block] = [
        ("h1", title),
        ("p", f"Built {time.strftime('%Y-%m-%d %H:%M')} from {out} ({status['done']} runs done, {status['failed']} "
              f"failed, {status['invalid']} invalid, {status['todo']} not run). "
              f"Command: {plan.get('command', '')}. Data: "
              f"{', '.join(sorted({str(r.get('dataset')) for r in rows if r.get('dataset')})) or '-'}."),
        ("p", "Verdicts are computed from the table below, never typed in: a difference counts only when larger than "
              "the seeds' standard deviation (or 0.5 points of error / 0.01 CKA with one seed). 'inconclusive' means "
              "the effect is within that noise at this scale; 'incomplete' means runs are missing."),
        ("h2", "Summary"), summary_table(verdicts),
    ]
    if invalid:
        blocks += [("p", "Invalid runs (their results failed verification and are left out; `widesparse reproduce` "
                         "quarantines and reruns them):"), ("list", invalid)]
    if plan.get("scale") == "tiny":
        blocks.append(("p", "Scale tiny: 8x8 digits images and widths of a few hundred units; the paper's trends "
                            "are about CIFAR/ImageNet at widths of 10^3-10^5. Disagreements here are reported as "
                            "measured, and may be a property of the tiny scale rather than of the claim."))
    for e in exps:
        x = get_experiment(e)
        v = verdicts[e]
        blocks += [("h2", f"{e}: {x.title}"),
                   ("p", f"Paper: {x.finding} Numbers: {x.paper_numbers}."),
                   ("p", f"Ours: {v.ours}."), ("p", f"Verdict: {v.status} (criterion: {v.detail})." if v.detail
                                                 else f"Verdict: {v.status}.")]
        try:
            for path in figures.draw(e, rows, out / "figures"):
                blocks.append(("img", str(path.relative_to(out)), f"{e} figure"))
        except ImportError:
            blocks.append(("p", "(No figure: matplotlib is not installed; pip install 'widesparse[plot]'.)"))
        mine = [a for a in agg if a.get("experiment") == e and a.get("role") != "train"]
        if mine:
            blocks.append(_agg_table(e, mine))
        if e == "E9":
            blocks += _e9_blocks()
        if e == "E10":
            blocks += _e10_blocks()
        blocks += [("p", "Our choices:"), ("list", list(x.choices))]
        failed = sorted({r["run_id"] + ": " + str(r.get("error")) for r in rows
                         if r["experiment"] == e and r["status"] == "failed"})
        if failed:
            blocks += [("p", "Failed runs:"), ("list", failed)]
    with sweep_lock(out):
        atomic_write(out / "report.md", lambda f: f.write(_render_md(blocks)))
        atomic_write(out / "report.html", lambda f: f.write(_render_html(blocks, out, title)))
    return {"verdicts": verdicts, "status": status, "summary_md": _render_md([summary_table(verdicts)])}
