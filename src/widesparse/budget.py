"""Connection budgets and width maximization for (S-)Mixers (docs/theory.md §3.5, §3.6, (10), (11)).

A Mixer block with S tokens, C channels and hidden widths D_S (token MLP), D_C (channel MLP) is, on
vec X, a sparse MLP of effective width m = S·C. Its four effective mixing matrices hold D_S·S·C, D_S·S·C,
D_C·C·S and D_C·C·S non-zeros; their average is the budget Ω of eq. (10). For one expansion γ
(D_S = γS, D_C = γC):

    Ω = γ(CS² + C²S)/2 = γ m (S + C)/2 = p γ m²,    p = (1/S + 1/C)/2             (10)
    S* = C* = (Ω/γ)^(1/3),   m* = (Ω/γ)^(2/3),   p* = 1/S*                         (11)

The token grids a patch tiling reaches (which S an image of a given side allows, and the patch giving it) live
here too: a sweep along (10) picks its S from them. Pure arithmetic: this module imports nothing from widesparse.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def _positive(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise ValueError unless it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return x


def _positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise ValueError unless it is a whole number >= 1."""
    x = _positive(name, value)
    if not x.is_integer():
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(x)


def _cbrt(x: float) -> float:
    """Cube root of x > 0, exact when x is a perfect cube (so (2**18)**(1/3) gives 64.0, not 63.999...)."""
    r = x ** (1.0 / 3.0)
    n = round(r)
    return float(n) if n > 0 and n**3 == x else r


def _too_small(omega: float, gamma: float, s_min: float) -> ValueError:
    need = gamma * (s_min + s_min * s_min) / 2.0
    return ValueError(
        f"budget too small: Omega={omega:g} with gamma={gamma:g} gives C < 1 for every requested S; "
        f"C >= 1 at S={s_min:g} needs Omega >= gamma*(S + S^2)/2 = {need:g} "
        f"(the smallest possible shape, S = C = 1, needs Omega >= gamma = {gamma:g})"
    )


def _hidden(
    S: float, C: float, gamma: float | None, token_hidden: float | None, channel_hidden: float | None
) -> tuple[float, float]:
    if gamma is None and (token_hidden is None or channel_hidden is None):
        raise ValueError("give gamma, or both token_hidden and channel_hidden")
    g = None if gamma is None else _positive("gamma", gamma)
    d_s = g * S if token_hidden is None else _positive("token_hidden", token_hidden)
    d_c = g * C if channel_hidden is None else _positive("channel_hidden", channel_hidden)
    return d_s, d_c


def connections_per_layer(
    S: float,
    C: float,
    gamma: float | None = None,
    *,
    token_hidden: float | None = None,
    channel_hidden: float | None = None,
) -> float:
    """Ω of eq. (10): average non-zeros of a block's four effective mixing matrices.

    With one expansion, Ω = γ(CS² + C²S)/2. With hidden widths D_S (token) and D_C (channel),
    Ω = (D_S·S·C + D_C·C·S)/2 (docs/theory.md §3.6, unequal expansions); ``token_hidden``/``channel_hidden``
    override the width γS/γC implied by ``gamma`` for their branch.
    """
    S, C = _positive("S", S), _positive("C", C)
    d_s, d_c = _hidden(S, C, gamma, token_hidden, channel_hidden)
    return (d_s * S * C + d_c * C * S) / 2.0


def block_connections(
    S: float,
    C: float,
    gamma: float | None = None,
    *,
    token_hidden: float | None = None,
    channel_hidden: float | None = None,
) -> float:
    """Total non-zeros of the four effective matrices of one block (§3.5): 2·D_S·S·C + 2·D_C·C·S = 4Ω."""
    return 4.0 * connections_per_layer(S, C, gamma, token_hidden=token_hidden, channel_hidden=channel_hidden)


def mixer_omega(S: float, C: float, token_hidden: float, channel_hidden: float) -> float:
    """Ω (10) of a Mixer with hidden widths D_S = ``token_hidden`` and D_C = ``channel_hidden``."""
    return connections_per_layer(S, C, token_hidden=token_hidden, channel_hidden=channel_hidden)


def effective_width(S: float, C: float) -> float:
    """Effective width m = S·C of the Mixer as an MLP on vec X (§2, §3.4)."""
    return _positive("S", S) * _positive("C", C)


def density(S: float, C: float) -> float:
    """Average density p = (1/S + 1/C)/2 of the effective weights (eq. (10); token 1/C, channel 1/S, §3.5)."""
    return (1.0 / _positive("S", S) + 1.0 / _positive("C", C)) / 2.0


def sw_mlp_width(omega: float, gamma: float, p: float) -> float:
    """Width m = √(Ω/(γp)) of an SW-MLP (m → γm → m, density p) with Ω = pγm² (§3.6)."""
    omega, gamma, p = _positive("omega", omega), _positive("gamma", gamma), _positive("p", p)
    if p > 1:
        raise ValueError(f"density p must be in (0, 1], got {p!r}")
    return math.sqrt(omega / (gamma * p))


def optimal_side(omega: float, gamma: float) -> float:
    """Continuous optimum S* = C* = (Ω/γ)^(1/3) of eq. (11)."""
    return _cbrt(_positive("omega", omega) / _positive("gamma", gamma))


def optimal_width(omega: float, gamma: float) -> float:
    """Maximal effective width m* = (Ω/γ)^(2/3) at fixed Ω (eq. (11))."""
    return optimal_side(omega, gamma) ** 2


def optimal_shape(omega: float, gamma: float) -> tuple[int, int]:
    """Integer optimum (S, C) of eq. (11): S = C = the integer nearest to (Ω/γ)^(1/3) (halves round up).

    The realized Ω = γS³ may then differ slightly from ``omega``. Raises ValueError when Ω < γ
    (no shape with S = C >= 1 fits).
    """
    omega, gamma = _positive("omega", omega), _positive("gamma", gamma)
    if omega < gamma:
        raise _too_small(omega, gamma, 1.0)
    n = max(1, math.floor(optimal_side(omega, gamma) + 0.5))
    return n, n


def solve_channels(omega: float, gamma: float, S: float) -> float:
    """Positive root C of S·C² + S²·C = 2Ω/γ (eq. (10) solved for C), unrounded.

    Uses the cancellation-free form C = 2K / (S² + √(S⁴ + 4SK)), K = 2Ω/γ.
    """
    omega, gamma, S = _positive("omega", omega), _positive("gamma", gamma), _positive("S", S)
    k = 2.0 * omega / gamma
    return 2.0 * k / (S * S + math.sqrt(S**4 + 4.0 * S * k))


@dataclass(frozen=True)
class Shape:
    """One (S, C) point on a fixed-Ω curve with its width m, hidden width γm, density p and realized Ω."""

    S: int
    C: float  # an int when produced with round_channels=True
    m: float
    gamma_m: float
    p: float
    omega: float
    is_optimum: bool = False


def shapes_for_budget(
    omega: float,
    gamma: float,
    S_values: Iterable[int],
    *,
    round_channels: bool = False,
) -> list[Shape]:
    """Shapes (S, C) along the fixed-Ω curve (10), one per S (the worked table of §3.6).

    C is solved with :func:`solve_channels`. With ``round_channels`` C becomes the nearest integer >= 1
    (halves round up) and m, γm, p, Ω are recomputed from it (the realized budget). S values whose solved C
    is below 1 are left out; if that leaves none, ValueError says how large Ω must be. Exactly one shape has
    ``is_optimum``: the one with the largest m (ties: the one with S closest to C, then the first).
    """
    omega, gamma = _positive("omega", omega), _positive("gamma", gamma)
    s_list = [_positive_int("S", s) for s in S_values]
    if not s_list:
        raise ValueError("S_values is empty")
    rows: list[Shape] = []
    for S in s_list:
        c = solve_channels(omega, gamma, S)
        if c < 1.0:
            continue
        if round_channels:
            c = max(1, math.floor(c + 0.5))
        m = S * c
        rows.append(Shape(S, c, m, gamma * m, density(S, c), connections_per_layer(S, c, gamma)))
    if not rows:
        raise _too_small(omega, gamma, float(min(s_list)))
    best = max(range(len(rows)), key=lambda i: (rows[i].m, -abs(rows[i].S - rows[i].C), -i))
    return [Shape(r.S, r.C, r.m, r.gamma_m, r.p, r.omega, i == best) for i, r in enumerate(rows)]


def default_S_values(omega: float, gamma: float) -> list[int]:
    """Powers of two S = 1, 2, 4, ... while the solved C stays >= 1, i.e. γ(S + S²)/2 <= Ω."""
    omega, gamma = _positive("omega", omega), _positive("gamma", gamma)
    if omega < gamma:
        raise _too_small(omega, gamma, 1.0)
    out, s = [], 1
    while gamma * (s + s * s) / 2.0 <= omega:
        out.append(s)
        s *= 2
    return out


# --------------------------------------------------------------------------------------------- token grids
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tokens_for_patch(image_size: int, patch: int | tuple[int, int]) -> int:
    """Token count S = (H/p_h)(W/p_w) of ``image_size``² images cut into ``patch`` (an int or ``(p_h, p_w)``)."""
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (image_size // ph) * (image_size // pw)


def reachable_tokens(image_size: int) -> list[int]:
    """Every token count S = (H/p_h)(W/p_w) that a (possibly non-square) patch tiling of the image reaches."""
    divs = _divisors(image_size)
    return sorted({(image_size // a) * (image_size // b) for a in divs for b in divs})


def patch_for_tokens(image_size: int, S: int) -> int | tuple[int, int]:
    """The squarest patch (an int when square) giving S tokens on ``image_size``² images (docs/theory.md §6.1)."""
    best = None
    for ph in _divisors(image_size):
        for pw in _divisors(image_size):
            if (image_size // ph) * (image_size // pw) == S:
                key = (abs(math.log(ph / pw)), -ph)
                if best is None or key < best[0]:
                    best = (key, (ph, pw))
    if best is None:
        raise ValueError(f"no patch tiling of {image_size}x{image_size} images gives S = {S} tokens; "
                         f"reachable: {', '.join(map(str, reachable_tokens(image_size)))}")
    ph, pw = best[1]
    return ph if ph == pw else (ph, pw)


def nearest_tokens(image_size: int, wanted: Sequence[float]) -> list[int]:
    """For each wanted S the reachable token count nearest in log scale (duplicates removed, order kept)."""
    reach = reachable_tokens(image_size)
    out: list[int] = []
    for w in wanted:
        s = min(reach, key=lambda r: (abs(math.log(r / w)), -r))
        if s not in out:
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------- CLI helpers

_NUM = r"(?:\d+(?:_\d+)*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_BUDGET_RE = re.compile(rf"^\s*(?P<base>{_NUM})\s*(?:(?:\*\*|\^)\s*(?P<exp>{_NUM})|(?P<suffix>[kKmMgG][iI]?))?\s*$")
_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _number(token: str) -> int | float:
    return int(token) if re.fullmatch(r"\d+(?:_\d+)*", token) else float(token)


def parse_budget(text: str) -> int | float:
    """Parse a budget such as "2**19", "2^19", "524288", "524_288", "5.2e5", "1M", "512Ki" (no eval).

    Suffixes: k/K, M, G are decimal (10³, 10⁶, 10⁹); Ki, Mi, Gi are binary (2¹⁰, 2²⁰, 2³⁰); case-insensitive.
    Returns an int when the value is a whole number, else a float. Raises ValueError naming ``text`` on
    anything else, and for non-positive or absurdly large (> 1e300) values.
    """
    if not isinstance(text, str):
        raise ValueError(f"budget must be a string, got {text!r}")
    match = _BUDGET_RE.match(text)
    if match is None:
        raise ValueError(
            f"cannot parse budget {text!r}: expected a positive number like 524288, 5.2e5, 2**19, 2^19 or 512K"
        )
    base = _number(match["base"])
    if match["exp"] is not None:
        exp = _number(match["exp"])
        if base > 1 and exp * math.log10(base) > 300:
            raise ValueError(f"budget {text!r} is too large")
        value: int | float = base**exp
    elif match["suffix"] is not None:
        value = base * _SUFFIX[match["suffix"].lower()]
    else:
        value = base
    if not math.isfinite(value) or value > 1e300:
        raise ValueError(f"budget {text!r} is too large")
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def _num(x: float, decimals: int) -> str:
    """An integral value without decimals, otherwise with ``decimals`` digits."""
    return str(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else f"{x:.{decimals}f}"


def _budget_label(omega: float) -> str:
    label = _num(omega, 1)
    if float(omega).is_integer() and omega >= 2:
        k = int(omega).bit_length() - 1
        if 2**k == int(omega):
            label += f" = 2^{k}"
    return label


def format_plan(shapes: Sequence[Shape], *, omega: float, gamma: float, unicode: bool = True) -> str:
    """Plain-text table (S, C, m, γm, p, Ω) of :func:`shapes_for_budget` with the optimum row marked.

    The header states Ω, γ and the continuous optimum of eq. (11). The optimum row starts with "*" and ends
    with "<- optimum". ``unicode=False`` spells γ and Ω as "gamma" and "Omega".
    """
    omega, gamma = _positive("omega", omega), _positive("gamma", gamma)
    if not shapes:
        raise ValueError("no shapes to format")
    om, ga, gm = ("Ω", "γ", "γm") if unicode else ("Omega", "gamma", "gamma*m")
    star = optimal_side(omega, gamma)
    lines = [
        f"{om} = {_budget_label(omega)} connections per layer (eq. 10), {ga} = {gamma:g}",
        f"continuous optimum (eq. 11): S* = C* = ({om}/{ga})^(1/3) = {_num(star, 2)}, "
        f"m* = {_num(star * star, 1)}, {gm}* = {_num(gamma * star * star, 1)}",
        "",
    ]
    header = ["", "S", "C", "m", gm, "p", om]
    body = [
        [
            "*" if s.is_optimum else "",
            str(s.S),
            _num(s.C, 1),
            str(round(s.m)),
            str(round(s.gamma_m)),
            f"{s.p:.4f}",
            str(round(s.omega)),
        ]
        for s in shapes
    ]
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    for row, shape in zip([header, *body], [None, *shapes], strict=True):
        line = "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        if shape is not None and shape.is_optimum:
            line += "  <- optimum"
        lines.append(line.rstrip())
    return "\n".join(lines)
