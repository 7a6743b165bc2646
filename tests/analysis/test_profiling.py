"""Tests of widesparse.analysis.profiling: the analytic E10 memory counts, connections, FLOPs and the measured step."""

from __future__ import annotations

import pytest
import torch

from widesparse.analysis.profiling import (
    count_connections,
    masked_sw_mlp_memory,
    measure_step,
    reset_peak_rss,
    status_bytes,
    step_flops,
)
from widesparse.budget import mixer_omega
from widesparse.models import create_model

TINY = {"image_size": 8, "patch_size": 2, "in_chans": 3, "dim": 6, "depth": 2, "token_hidden": 5,
        "channel_hidden": 7, "num_classes": 4}


def test_mixer_b16_matches_the_papers_derived_numbers() -> None:
    r = masked_sw_mlp_memory(196, 768, 384, 3072, 12)
    assert r["width"] == 150_528
    assert r["hidden"] == {"token": 294_912, "channel": 602_112}
    assert r["layer_weights"]["channel_fc1"] == 602_112 * 150_528 == 90_634_715_136  # ≈ 9.06e10 (docs/theory.md E10)
    assert r["dense_weights"] == 24 * (602_112 + 294_912) * 150_528 == 3_240_653_488_128  # ≈ 3.24e12
    assert r["sw_mlp_bytes"]["weights"] == 4 * r["dense_weights"]  # ≈ 13 TB fp32
    # the closest natural counting to the paper's 23.2 TB: fp32 weights + fp32 masks, read as TiB (1.6 % above)
    assert r["paper_comparison"]["sw_mlp"]["weights_float_mask"]["binary"] == pytest.approx(1.0163, abs=1e-4)
    # the Mixer-B/16 mixing weights alone are 233.7 MB in fp32, 8.9x the paper's 26.3 MB
    assert r["mixer_mixing_weights"] == 12 * (2 * 196 * 384 + 2 * 768 * 3072) == 58_429_440
    assert r["mixer_bytes"]["weights"] / 26.3e6 == pytest.approx(8.8866, abs=1e-3)
    assert r["connections"] == 12 * 4 * mixer_omega(196, 768, 384, 3072)  # Ω (10) is per layer: 4 layers a block


def test_masked_memory_scales_with_dtype_and_rejects_bad_sizes() -> None:
    a, b = masked_sw_mlp_memory(4, 3, 2, 5, 2), masked_sw_mlp_memory(4, 3, 2, 5, 2, dtype_bytes=2)
    assert a["dense_weights"] == 2 * 2 * 12 * (3 * 2 + 4 * 5)
    assert b["sw_mlp_bytes"]["weights"] * 2 == a["sw_mlp_bytes"]["weights"]
    assert a["sw_mlp_bytes"]["training"] == a["dense_weights"] * 17
    with pytest.raises(ValueError, match="channel_hidden must be a positive int, got 0"):
        masked_sw_mlp_memory(4, 3, 2, 0, 2)


def test_connections_of_mixer_and_masked_sw_mlp_equal_omega() -> None:
    S = (TINY["image_size"] // TINY["patch_size"]) ** 2
    omega = 4 * TINY["depth"] * mixer_omega(S, TINY["dim"], TINY["token_hidden"], TINY["channel_hidden"])
    mixer = create_model("mixer", **TINY)
    assert count_connections(mixer) == {"structured": omega, "dense": 6 * 12 + 4 * 6}
    masked = create_model("sw_mlp", **TINY, backend="masked")
    got = count_connections(masked)["structured"]
    assert got == sum(int(m.mask.sum()) for m in masked.modules() if hasattr(m, "mask") and m.mask is not None)
    assert 0.7 * omega < got < 1.3 * omega


def test_step_flops_equal_the_matmul_count() -> None:
    torch.manual_seed(0)
    m = create_model("mixer", **TINY, dtype=torch.float64)
    B, S, C, K = 3, 16, 6, 12
    x, y = torch.randn(B, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    per_block = 2 * 2 * S * C * TINY["token_hidden"] + 2 * 2 * S * C * TINY["channel_hidden"]
    fwd = B * (2 * S * K * C + TINY["depth"] * per_block + 2 * C * 4)
    stem_input_grad = B * 2 * S * K * C  # the images need no gradient
    assert step_flops(m, x, y) == 3 * fwd - stem_input_grad
    rp = create_model("rp_mixer", **TINY, dtype=torch.float64)
    assert step_flops(rp, x, y) == step_flops(m, x, y)  # RP FLOPs equal the Mixer's (docs/theory.md E10)


def test_proc_helpers() -> None:
    rss, hwm = status_bytes("VmRSS"), status_bytes("VmHWM")
    if rss == 0:
        pytest.skip("no /proc/self/status on this platform")
    assert rss > 0 and hwm > 0  # (VmHWM may lag behind VmRSS after a reset: the kernel updates it lazily)
    with pytest.raises(KeyError, match="no field 'VmNope'"):
        status_bytes("VmNope")
    if reset_peak_rss():  # raise the peak by 64 MiB, free it, reset: the peak falls back near the resident set
        big = torch.ones(64 << 20, dtype=torch.uint8)
        peak = max(status_bytes("VmHWM"), status_bytes("VmRSS"))
        del big
        assert reset_peak_rss()
        assert status_bytes("VmHWM") < peak - (32 << 20)


@pytest.mark.slow
def test_measure_step_in_process_and_isolated() -> None:
    here = measure_step("mixer", {k: v for k, v in TINY.items() if k not in ("image_size", "in_chans", "num_classes")},
                        batch_size=4, image_size=8, in_chans=3, num_classes=4, steps=2, isolate=False)
    assert here["params"] == sum(p.numel() for p in create_model("mixer", **TINY).parameters())
    assert here["step_seconds"] > 0 and len(here["step_seconds_all"]) == 2
    assert here["flops_per_step"] > 0
    big = {"patch_size": 4, "dim": 32, "depth": 1, "token_hidden": 16, "channel_hidden": 128}
    iso = measure_step("sw_mlp", {**big, "backend": "masked"}, batch_size=8, image_size=16, in_chans=3,
                       num_classes=10, steps=1)
    if iso["peak_reset_exact"]:
        # dense masked weights (m = 512: 2 x (m x 512 + m x 2048)) in fp32, with gradients and AdamW moments
        assert iso["peak_bytes"] > 4 * 4 * iso["params"] * 0.9
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: fp32, bf16"):
        measure_step("mixer", {}, batch_size=1, image_size=8, in_chans=3, num_classes=2, precision="fp16")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        measure_step("mixer", {}, batch_size=0, image_size=8, in_chans=3, num_classes=2)
