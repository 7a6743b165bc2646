"""Our verdict on each of the paper's findings, computed from the results table (never typed in).

``judge(exp_id, rows)`` returns a :class:`Verdict`: ``agrees``, ``partly``, ``disagrees``, ``inconclusive``
(the effect is within seed noise, or the scale cannot show it) or ``incomplete`` (runs missing), with the numbers
it was decided on. Differences count only when larger than the seeds' standard deviation (or 0.5 points of
error with a single seed); that rule is deliberately simple and stated in the report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import spearmanr

__all__ = ["Verdict", "judge", "mean_by", "JUDGES"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    status: str  # agrees | partly | disagrees | inconclusive | incomplete
    ours: str  # our numbers, one line
    detail: str = ""


def mean_by(rows: Sequence[Row], key: str, metric: str, **where: Any) -> dict[Any, tuple[float, float, int]]:
    """``{key value: (mean, std, n)}`` of ``metric`` over done rows matching ``where``."""
    vals: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "done" and all(r.get(k) == v for k, v in where.items()) and r.get(metric) is not None:
            vals[r[key]].append(float(r[metric]))
    out = {}
    for k, v in vals.items():
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        out[k] = (m, sd, len(v))
    return dict(sorted(out.items(), key=lambda kv: kv[0]))


def _noise(*stats: tuple[float, float, int], floor: float = 0.005) -> float:
    return max([floor, *[s[1] for s in stats]])


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _params(stats: dict[Any, tuple[float, float, int]], key: Any) -> str:
    return f" ({stats[key][0]:,.0f} parameters)" if key in stats else ""


def _both(a: bool, b: bool) -> str:
    """``agrees`` when both parts of a finding hold, ``partly`` when one does, else ``disagrees``."""
    return "agrees" if a and b else "partly" if a or b else "disagrees"


def _rho(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 3:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


def _e1(rows: Sequence[Row]) -> Verdict:
    cka = [r for r in rows if r.get("role") == "cka"]
    parts, ok = [], []
    for series in sorted({r["series"] for r in cka}):
        d = mean_by(cka, "p", "diag_mean", series=series)
        if len(d) < 3:
            return Verdict("incomplete", f"{len(d)} densities done for {series}")
        C = next(r["C"] for r in cka if r["series"] == series)
        p_best = max(d, key=lambda p: d[p][0])
        near = abs(math.log2(p_best * C)) <= 1.0
        dense = d.get(1.0)
        beats = dense is None or d[p_best][0] - dense[0] > _noise(d[p_best], dense, floor=0.01)
        ok.append((near, beats))
        parts.append(f"{series}: peak {d[p_best][0]:.3f} at p = 1/{1 / p_best:g} (1/C = 1/{C}); dense "
                     f"{dense[0]:.3f}" if dense else f"{series}: peak {d[p_best][0]:.3f} at p = 1/{1 / p_best:g}")
    status = _both(all(a for a, _ in ok), all(b for _, b in ok))
    if status == "disagrees" and any(a or b for a, b in ok):
        status = "partly"
    return Verdict(status, "; ".join(parts), "peak within a factor 2 of p = 1/C, and above the dense MLP by more "
                   "than the seeds' spread")


def _e2(rows: Sequence[Row]) -> Verdict:
    mix = mean_by(rows, "gamma_m", "test_err", series="mixer")
    sw = mean_by(rows, "gamma_m", "test_err", series="sw_mlp")
    if len(mix) < 3 or len(sw) < 2:
        return Verdict("incomplete", f"{len(mix)} Mixer and {len(sw)} SW-MLP widths done")
    r_mix = _rho(list(mix), [v[0] for v in mix.values()])
    r_sw = _rho(list(sw), [v[0] for v in sw.values()])
    gm_mix = min(mix, key=lambda g: mix[g][0])
    gm_sw_max = max(sw)
    widest_mix = max(mix)
    sw_worse = sw[gm_sw_max][0] - mix[widest_mix][0] > _noise(sw[gm_sw_max], mix[widest_mix])
    ours = (f"Mixer: error {_pct(mix[min(mix)][0])} at γm = {min(mix):g} -> {_pct(mix[widest_mix][0])} at "
            f"{widest_mix:g} (best {_pct(mix[gm_mix][0])} at {gm_mix:g}), Spearman(γm, err) = {r_mix:.2f}; SW-MLP: "
            f"{_pct(sw[min(sw)][0])} at {min(sw):g} -> {_pct(sw[gm_sw_max][0])} at {gm_sw_max:g}, ρ = {r_sw:.2f}")
    improves = r_mix < 0 and (r_sw < 0 or len(sw) < 3)
    status = _both(improves, sw_worse)
    return Verdict(status, ours, "both improve with width (negative rank correlation); the widest SW-MLP is worse "
                   "than the widest Mixer")


def _e3(rows: Sequence[Row]) -> Verdict:
    mix = mean_by(rows, "m", "sigma_max", series="mixer")
    sw = mean_by(rows, "m", "sigma_max", series="sw_mlp")
    if len(mix) < 2 or len(sw) < 2:
        return Verdict("incomplete", f"{len(mix)} Mixer and {len(sw)} SW-MLP widths done")
    edge = next(r["mp_edge"] for r in rows if r.get("status") == "done" and r.get("mp_edge"))
    mv = [v[0] for v in mix.values()]
    flat = (max(mv) - min(mv)) / edge < 0.1 and all(abs(v - edge) / edge < 0.1 for v in mv)
    sw_lo, sw_hi = sw[min(sw)][0], sw[max(sw)][0]
    grows = sw_hi > 1.02 * sw_lo
    ours = (f"Mixer σ_max {min(mv):.3f}-{max(mv):.3f} over m = {min(mix):g}-{max(mix):g} (1+√γ = {edge:.3f}); "
            f"SW-MLP {sw_lo:.3f} at m = {min(sw):g} -> {sw_hi:.3f} at m = {max(sw):g}")
    for series in ("mixer (trained)", "sw_mlp (trained)"):
        tr = [v[0] for v in mean_by(rows, "m", "sigma_max", series=series).values()]
        if tr:
            ours += f"; {series} {min(tr):.3f}-{max(tr):.3f}"
    status = _both(flat, grows)
    return Verdict(status, ours, "Mixer within 10% of 1+√γ at every width; SW-MLP grows by more than 2%")


def _e4(rows: Sequence[Row]) -> Verdict:
    d = mean_by(rows, "series", "test_err")
    if len(d) < 2:
        return Verdict("incomplete", f"{len(d)} of 2 models done")
    a, b = d["monarch_mlp"], d["kron_mlp"]
    close = abs(a[0] - b[0]) <= max(0.01, 2 * _noise(a, b))
    ours = (f"Monarch {_pct(a[0])} ± {_pct(a[1])}, Kronecker (tied) {_pct(b[0])} ± {_pct(b[1])} over {a[2]} seeds")
    return Verdict("agrees" if close else "disagrees", ours, "comparable: within 1 point or 2 seed std")


def _e5(rows: Sequence[Row]) -> Verdict:
    rhos, valleys, parts = [], [], []
    for budget in sorted({r.get("budget") for r in rows if r.get("budget")}):
        for v in ("s_mixer", "rp_s_mixer"):
            d = mean_by(rows, "m", "test_err", series=v, budget=budget)
            e = mean_by(rows, "log2_S_over_C", "test_err", series=v, budget=budget)
            if len(d) < 3:
                continue
            rho = _rho(list(d), [x[0] for x in d.values()])
            best = min(e, key=lambda k: e[k][0])
            rhos.append(rho)
            valleys.append(abs(best) <= 1.0)
            parts.append(f"{v} Ω={budget}: ρ(m, err) = {rho:.2f}, best at log2(S/C) = {best:.1f}")
    if not rhos:
        return Verdict("incomplete", "fewer than 3 widths done per series")
    falls = sum(r < 0 for r in rhos) > len(rhos) / 2
    plateau = sum(valleys) > len(valleys) / 2
    status = _both(falls, plateau)
    return Verdict(status, "; ".join(parts), "error falls with m in most series and is lowest within a factor 2 "
                   "of S = C")


def _e6(rows: Sequence[Row]) -> Verdict:
    done = [r for r in rows if r.get("status") == "done"]
    if len(done) < 3:
        return Verdict("incomplete", f"{len(done)} runs done")
    best = max(r["train_acc"] for r in done)
    kept = [r for r in done if r["train_acc"] >= 0.99 * best]
    d = mean_by(kept, "gamma", "test_err")
    rho = _rho(list(d), [x[0] for x in d.values()]) if len(d) >= 3 else float("nan")
    ours = (f"{len(kept)} of {len(done)} runs pass the training-accuracy filter; error by γ: "
            + ", ".join(f"{g:g}: {_pct(v[0])}" for g, v in d.items()) + f"; ρ(γ, err) = {rho:.2f}")
    if math.isnan(rho):
        return Verdict("inconclusive", ours, "fewer than 3 γ values left after the filter")
    return Verdict("agrees" if rho < 0 else "disagrees", ours, "negative rank correlation of error with γ")


def _e7(rows: Sequence[Row]) -> Verdict:
    parts, ok = [], []
    for ds in sorted({r["dataset"] for r in rows}):
        for v in ("mixer", "rp_mixer"):
            d = mean_by(rows, "log2_S_over_C", "test_err", series=v, dataset=ds)
            if len(d) < 3:
                continue
            best = min(d, key=lambda k: d[k][0])
            ends = [d[min(d)], d[max(d)]]
            valley = all(e[0] - d[best][0] > _noise(e, d[best]) for e in ends)
            ok.append(abs(best) <= 1.0 and valley)
            pm = mean_by(rows, "log2_S_over_C", "params", series=v, dataset=ds)
            near = min(d, key=abs)
            parts.append(f"{ds} {v}: lowest error {_pct(d[best][0])} at log2(S/C) = {best:.2f}{_params(pm, best)}, "
                         f"{_pct(d[near][0])} nearest S = C{_params(pm, near)}; ends {_pct(ends[0][0])} / "
                         f"{_pct(ends[1][0])}")
    if not ok:
        return Verdict("incomplete", "fewer than 3 shapes done per series")
    status = "agrees" if all(ok) else "partly" if any(ok) else "disagrees"
    return Verdict(status, "; ".join(parts), "a valley (both ends worse beyond noise) whose minimum lies within "
                   "a factor 2 of S = C")


def _e8(rows: Sequence[Row]) -> Verdict:
    n = mean_by(rows, "L", "test_err", series="mixer")
    r = mean_by(rows, "L", "test_err", series="rp_mixer")
    Ls = sorted(set(n) & set(r))
    if len(Ls) < 2:
        return Verdict("incomplete", f"{len(Ls)} depths done for both variants")
    diff = {L: r[L][0] - n[L][0] for L in Ls}
    shallow_worse = diff[Ls[0]] > _noise(n[Ls[0]], r[Ls[0]])
    deep_ok = diff[Ls[-1]] <= _noise(n[Ls[-1]], r[Ls[-1]])
    ours = "RP - normal error by depth: " + ", ".join(f"L={L}: {100 * diff[L]:+.2f} pt" for L in Ls)
    status = _both(shallow_worse, deep_ok)
    if not shallow_worse and deep_ok:
        status = "inconclusive" if all(abs(v) <= _noise(n[L], r[L]) for L, v in diff.items()) else "partly"
    return Verdict(status, ours, "RP worse than normal at the shallowest depth, and not worse at the deepest")


def _e9(rows: Sequence[Row]) -> Verdict:
    d = mean_by(rows, "S", "test_err")
    if len(d) < 2:
        return Verdict("incomplete", f"{len(d)} of 2 models done")
    narrow, wide = d[min(d)], d[max(d)]
    pm = mean_by(rows, "S", "params")
    ours = (f"S = {min(d)}: {_pct(narrow[0])} ± {_pct(narrow[1])}{_params(pm, min(d))}; S = {max(d)} (wider m at "
            f"equal connections): {_pct(wide[0])} ± {_pct(wide[1])}{_params(pm, max(d))}")
    gain = narrow[0] - wide[0]
    if abs(gain) <= _noise(narrow, wide):
        return Verdict("inconclusive", ours, "difference within the seeds' spread")
    return Verdict("agrees" if gain > 0 else "disagrees", ours, "the wider Mixer has the lower error")


def _e10(rows: Sequence[Row]) -> Verdict:
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return Verdict("incomplete", "no measurement done")
    m = max(r["m"] for r in done)
    at = {r["series"]: r for r in done if r["m"] == m}
    need = ("mixer", "rp_mixer", "sw_mlp (masked)", "sw_mlp (sparse)")
    if any(k not in at for k in need):
        return Verdict("incomplete", f"missing {[k for k in need if k not in at]} at m = {m}")
    mb = {k: at[k].get("peak_bytes", 0) / 2**20 for k in need}
    fl = {k: at[k].get("flops_per_step") for k in need}
    ours = (f"at m = {m}: peak MiB " + ", ".join(f"{k} {v:.1f}" for k, v in mb.items())
            + f"; RP/Mixer FLOPs {fl['rp_mixer'] / fl['mixer']:.4f}" if fl["mixer"] else "")
    masked_big = mb["sw_mlp (masked)"] > max(mb["mixer"], mb["sw_mlp (sparse)"])
    rp_same = fl["mixer"] and abs(fl["rp_mixer"] / fl["mixer"] - 1) < 0.01
    status = _both(masked_big, bool(rp_same))
    return Verdict(status, ours, "masked SW-MLP needs the most memory; RP FLOPs equal the Mixer's")


JUDGES: dict[str, Callable[[Sequence[Row]], Verdict]] = {
    "E1": _e1, "E2": _e2, "E3": _e3, "E4": _e4, "E5": _e5, "E6": _e6, "E7": _e7, "E8": _e8, "E9": _e9, "E10": _e10,
}


def judge(exp: str, rows: Sequence[Row]) -> Verdict:
    """The verdict for experiment ``exp`` from its rows (all statuses; only ``done`` rows count)."""
    mine = [r for r in rows if r.get("experiment") == exp]
    if not mine:
        return Verdict("incomplete", "not run")
    missing = sum(r.get("status") != "done" for r in mine)
    try:
        v = JUDGES[exp](mine)
    except (KeyError, ValueError, ZeroDivisionError) as e:
        return Verdict("incomplete", f"cannot judge yet ({type(e).__name__}: {e})")
    if missing and v.status != "incomplete":
        v = Verdict(v.status, v.ours + f" ({missing} of {len(mine)} points missing)", v.detail)
    return v
