"""Tests for widesparse.budget: docs/theory.md §3.5-§3.6, eqs. (10), (11) and the worked table."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from widesparse.budget import (
    Shape,
    block_connections,
    connections_per_layer,
    default_S_values,
    density,
    effective_width,
    format_plan,
    mixer_omega,
    optimal_shape,
    optimal_side,
    optimal_width,
    parse_budget,
    shapes_for_budget,
    solve_channels,
    sw_mlp_width,
)

OMEGA = 2**19
GAMMA = 2
# docs/theory.md §3.6 worked table (Ω = 2^19, γ = 2), values as printed there.
TABLE_S = [4, 8, 16, 32, 64, 128, 256]
TABLE_C = [360.0, 252.0, 173.2, 113.0, 64.0, 26.5, 7.8]
TABLE_M = [1440, 2016, 2771, 3616, 4096, 3393, 1988]
TABLE_GM = [2880, 4032, 5542, 7232, 8192, 6786, 3975]
TABLE_P = [0.1264, 0.0645, 0.0341, 0.0200, 1 / 64, 0.0228, 0.0663]


def test_worked_table_reproduced():
    shapes = shapes_for_budget(OMEGA, GAMMA, TABLE_S)
    assert [s.S for s in shapes] == TABLE_S
    for s, c, m, gm, p in zip(shapes, TABLE_C, TABLE_M, TABLE_GM, TABLE_P, strict=True):
        assert round(s.C, 1) == pytest.approx(c)
        assert round(s.m) == m
        assert round(s.gamma_m) == gm
        assert s.p == pytest.approx(p, abs=5e-5)
        assert s.omega == pytest.approx(OMEGA, rel=1e-12)
    assert [s.is_optimum for s in shapes] == [S == 64 for S in TABLE_S]


def test_optimum_at_2_19():
    assert optimal_shape(OMEGA, GAMMA) == (64, 64)
    assert optimal_side(OMEGA, GAMMA) == 64.0
    assert optimal_width(OMEGA, GAMMA) == 4096.0
    (best,) = [s for s in shapes_for_budget(OMEGA, GAMMA, default_S_values(OMEGA, GAMMA)) if s.is_optimum]
    assert (best.S, best.C, best.m, best.gamma_m, best.p) == (64, 64.0, 4096.0, 8192.0, 1 / 64)


def test_solve_channels_exact_and_root():
    assert solve_channels(OMEGA, GAMMA, 64) == 64.0
    for S in [1, 3, 4, 100, 1000, 10**5]:
        C = solve_channels(OMEGA, GAMMA, S)
        assert C > 0
        assert S * C**2 + S**2 * C == pytest.approx(2 * OMEGA / GAMMA, rel=1e-12)


def test_eq11_max_of_m_on_dense_grid():
    for omega, gamma in [(OMEGA, GAMMA), (2**18, 1), (10**6, 3), (123457.0, 1.5)]:
        grid = np.linspace(1.0, 2 * optimal_side(omega, gamma) + 10, 20001)
        m = np.array([S * solve_channels(omega, gamma, S) for S in grid])
        m_star = (omega / gamma) ** (2 / 3)
        assert m.max() <= m_star * (1 + 1e-12)
        assert m.max() == pytest.approx(m_star, rel=1e-6)
        assert grid[m.argmax()] == pytest.approx((omega / gamma) ** (1 / 3), rel=2e-3)
        # Ω/γ >= m^{3/2} everywhere along the curve
        assert np.all(m**1.5 <= omega / gamma * (1 + 1e-12))


def test_eq10_identities():
    rng = random.Random(0)
    for _ in range(50):
        S, C, g = rng.randint(1, 300), rng.randint(1, 300), rng.choice([0.5, 1, 2, 4, 3.7])
        omega = connections_per_layer(S, C, g)
        m, p = effective_width(S, C), density(S, C)
        assert m == S * C
        assert omega == pytest.approx(g * (C * S**2 + C**2 * S) / 2, rel=1e-12)
        assert omega == pytest.approx(g * m * (S + C) / 2, rel=1e-12)
        assert omega == pytest.approx(p * g * m**2, rel=1e-12)
        assert block_connections(S, C, g) == pytest.approx(4 * omega, rel=1e-12)


def test_unequal_expansions():
    # Mixer-B/16-like: S = 196, C = 768, D_S = 384, D_C = 3072 (PAPER §2)
    S, C, ds, dc = 196, 768, 384, 3072
    omega = (ds * S * C + dc * C * S) / 2
    assert connections_per_layer(S, C, token_hidden=ds, channel_hidden=dc) == omega
    assert mixer_omega(S, C, ds, dc) == omega
    assert block_connections(S, C, token_hidden=ds, channel_hidden=dc) == 2 * ds * S * C + 2 * dc * C * S
    # γ_t, γ_c form of §3.6 and overriding only one branch
    gt, gc = 1.5, 4
    assert mixer_omega(S, C, gt * S, gc * C) == pytest.approx((gt * S**2 * C + gc * C**2 * S) / 2)
    assert connections_per_layer(S, C, 4, token_hidden=ds) == (ds * S * C + 4 * C * C * S) / 2
    # equal hidden widths γS, γC agree with the single-γ formula
    assert mixer_omega(64, 32, 2 * 64, 2 * 32) == connections_per_layer(64, 32, 2)
    with pytest.raises(ValueError, match="gamma"):
        connections_per_layer(S, C, token_hidden=ds)


def test_sw_mlp_widths():
    widths = [sw_mlp_width(OMEGA, GAMMA, p) for p in [1, 1 / 4, 1 / 16, 1 / 64, 1 / 256]]
    assert widths == pytest.approx([512, 1024, 2048, 4096, 8192], rel=1e-12)
    # a Mixer and an SW-MLP of equal m share p and Ω
    S, C = 32, 128
    assert sw_mlp_width(connections_per_layer(S, C, 2), 2, density(S, C)) == pytest.approx(S * C)
    with pytest.raises(ValueError, match="1.5"):
        sw_mlp_width(OMEGA, GAMMA, 1.5)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2**19", 524288),
        ("2^19", 524288),
        (" 2 ** 19 ", 524288),
        ("524288", 524288),
        ("524_288", 524288),
        ("5.2e5", 520000),
        ("1e6", 10**6),
        ("1M", 10**6),
        ("512k", 512000),
        ("512Ki", 2**19),
        ("0.5Mi", 2**19),
        ("2.5", 2.5),
        ("4**0.5", 2),
    ],
)
def test_parse_budget(text, value):
    out = parse_budget(text)
    assert out == value
    assert type(out) is type(value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "2**",
        "__import__('os')",
        "2*19",
        "-5",
        "0",
        "0**3",
        "nan",
        "inf",
        "1e999",
        "10**400",
        "2**-3",
        "1X",
        "2^19K",
    ],
)
def test_parse_budget_errors(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_budget(text)


def test_parse_budget_rejects_non_string():
    with pytest.raises(ValueError):
        parse_budget(524288)  # type: ignore[arg-type]


def test_too_small_budget():
    with pytest.raises(ValueError, match="too small") as info:
        shapes_for_budget(10, 2, [4, 8])
    # C >= 1 at S = 4 needs Ω >= γ(S + S²)/2 = 20
    assert "20" in str(info.value)
    with pytest.raises(ValueError, match="too small"):
        optimal_shape(1.5, 2)
    with pytest.raises(ValueError, match="too small"):
        default_S_values(1, 2)
    # exactly at the minimum S = C = 1 fits
    assert optimal_shape(2, 2) == (1, 1)
    (s,) = shapes_for_budget(2, 2, [1])
    assert (s.S, s.C, s.omega, s.is_optimum) == (1, 1.0, 2.0, True)


def test_rows_with_c_below_one_are_dropped():
    shapes = shapes_for_budget(OMEGA, GAMMA, [64, 1024])
    assert [s.S for s in shapes] == [64]


@pytest.mark.parametrize(
    ("omega", "gamma", "S_values"),
    [
        (0, 2, [4]),
        (-1, 2, [4]),
        (OMEGA, 0, [4]),
        (OMEGA, -2, [4]),
        (OMEGA, 2, [0]),
        (OMEGA, 2, [-4]),
        (OMEGA, 2, [4.5]),
        (float("nan"), 2, [4]),
    ],
)
def test_bad_inputs(omega, gamma, S_values):
    with pytest.raises(ValueError):
        shapes_for_budget(omega, gamma, S_values)


def test_bad_input_messages_name_numbers():
    with pytest.raises(ValueError, match="-3"):
        solve_channels(-3, 2, 4)
    with pytest.raises(ValueError, match="-7"):
        shapes_for_budget(OMEGA, 2, [4, -7])
    with pytest.raises(ValueError, match="0"):
        optimal_shape(OMEGA, 0)
    with pytest.raises(ValueError, match="empty"):
        shapes_for_budget(OMEGA, 2, [])


def test_optimal_shape_rounding_non_cube():
    # (Ω/γ)^(1/3) = 100.4... -> 100; 100.6 -> 101; 1e6 with γ=1 is exactly 100
    assert optimal_shape(100.4**3, 1) == (100, 100)
    assert optimal_shape(2 * 100.6**3, 2) == (101, 101)
    assert optimal_shape(10**6, 1) == (100, 100)
    # reported S-Mixer budgets are cubes at γ = 1 (PAPER §3.2)
    assert [optimal_shape(2**k, 1) for k in (18, 21, 27)] == [(64, 64), (128, 128), (512, 512)]
    # 2^20 / 2 = 2^19: cube root 80.6 -> 81
    assert optimal_shape(2**20, 2) == (81, 81)
    assert all(isinstance(v, int) for v in optimal_shape(2**20, 2))


def test_round_channels_realized_budget():
    shapes = shapes_for_budget(OMEGA, GAMMA, TABLE_S, round_channels=True)
    assert [s.C for s in shapes] == [360, 252, 173, 113, 64, 27, 8]
    assert all(isinstance(s.C, int) for s in shapes)
    for s in shapes:
        assert s.m == s.S * s.C
        assert s.gamma_m == GAMMA * s.m
        assert s.p == density(s.S, s.C)
        assert s.omega == connections_per_layer(s.S, s.C, GAMMA)
    assert [s.S for s in shapes if s.is_optimum] == [64]
    # rounding never goes below C = 1
    (s,) = shapes_for_budget(GAMMA * (512 + 512**2) / 2, GAMMA, [512], round_channels=True)
    assert s.C == 1


def test_default_S_values():
    vals = default_S_values(OMEGA, GAMMA)
    assert vals == [2**k for k in range(10)]  # C(1024) < 1 <= C(512)
    assert solve_channels(OMEGA, GAMMA, vals[-1]) >= 1 > solve_channels(OMEGA, GAMMA, 2 * vals[-1])
    assert default_S_values(2, 2) == [1]


def test_shape_is_frozen():
    s = shapes_for_budget(OMEGA, GAMMA, [64])[0]
    assert isinstance(s, Shape)
    with pytest.raises(AttributeError):
        s.S = 3  # type: ignore[misc]


def test_format_plan_marks_optimum():
    shapes = shapes_for_budget(OMEGA, GAMMA, default_S_values(OMEGA, GAMMA))
    text = format_plan(shapes, omega=OMEGA, gamma=GAMMA)
    lines = text.splitlines()
    assert "524288" in lines[0] and "γ = 2" in lines[0]
    assert "(Ω/γ)^(1/3) = 64" in text
    marked = [line for line in lines if "<- optimum" in line]
    assert len(marked) == 1
    assert marked[0].lstrip().startswith("*")
    assert marked[0].split()[1:6] == ["64", "64", "4096", "8192", "0.0156"]
    # the table rows of the worked table are printed as in PAPER §3.6
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0].isdigit()}
    assert rows["128"][1:4] == ["26.5", "3393", "6786"]
    assert rows["4"][1:4] == ["360.0", "1440", "2880"]
    ascii_text = format_plan(shapes, omega=OMEGA, gamma=GAMMA, unicode=False)
    assert ascii_text.isascii() and "<- optimum" in ascii_text
    with pytest.raises(ValueError):
        format_plan([], omega=OMEGA, gamma=GAMMA)


def test_format_plan_integer_rounding_non_power_of_two():
    shapes = shapes_for_budget(10**6, 1, [25, 50, 100, 200], round_channels=True)
    text = format_plan(shapes, omega=10**6, gamma=1)
    (marked,) = [line for line in text.splitlines() if line.endswith("<- optimum")]
    assert marked.split()[1:3] == ["100", "100"]
    assert math.isclose(optimal_width(10**6, 1), 10**4)
