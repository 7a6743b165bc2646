"""Memory, FLOPs and step time of Mixer, RP-Mixer and the matched SW-MLP (masked and sparse), docs/theory.md E10.

Every model of a configuration has the same S, C, D_S, D_C and depth; the SW-MLP is matched to the Mixer
(``token_hidden``/``channel_hidden`` = D_S/D_C, so width m = S*C and the Mixer's connection count). Each model
is measured by :func:`widesparse.analysis.profiling.measure_step` in a fresh child process: peak resident memory of the
training steps over the memory before building (CPU; ``max_memory_allocated`` on a GPU), median step time,
FlopCounterMode FLOPs of forward + backward, parameters and connections. Beside it, the analytic bytes of the
dense-masked SW-MLP (:func:`widesparse.analysis.profiling.masked_sw_mlp_memory`) for each configuration and at
Mixer-B/16 size, where the paper reports 23.2 TB vs 26.3 MB.

    python benchmarks/bench_memory.py [--quick] [--threads 1] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from widesparse.analysis.profiling import masked_sw_mlp_memory, measure_step

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # image 32 px, 3 channels, 10 classes
    "S16_C32": {"patch_size": 8, "dim": 32, "depth": 2, "token_hidden": 32, "channel_hidden": 128, "batch": 32},
    "S16_C64": {"patch_size": 8, "dim": 64, "depth": 4, "token_hidden": 32, "channel_hidden": 256, "batch": 64},
}
MODELS = {
    "mixer": ("mixer", {}),
    "rp_mixer": ("rp_mixer", {}),
    "sw_mlp_sparse": ("sw_mlp", {"backend": "sparse"}),
    "sw_mlp_masked": ("sw_mlp", {"backend": "masked"}),
}


def run_config(name: str, cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    kw = {k: v for k, v in cfg.items() if k != "batch"}
    S = (32 // cfg["patch_size"]) ** 2
    out: dict[str, Any] = {"config": {**cfg, "S": S, "image_size": 32}, "models": {},
                           "analytic": masked_sw_mlp_memory(S, cfg["dim"], cfg["token_hidden"],
                                                            cfg["channel_hidden"], cfg["depth"])}
    for label, (model, extra) in MODELS.items():
        print(f"{name}: {label} ...", file=sys.stderr, flush=True)
        try:
            out["models"][label] = measure_step(model, {**kw, **extra}, batch_size=cfg["batch"], image_size=32,
                                                in_chans=3, num_classes=10, steps=steps)
        except RuntimeError as e:
            out["models"][label] = {"error": str(e)[-500:]}
    ms = out["models"]
    if "peak_bytes" in ms.get("sw_mlp_masked", {}) and "peak_bytes" in ms.get("mixer", {}):
        out["masked_over_mixer_peak"] = ms["sw_mlp_masked"]["peak_bytes"] / max(ms["mixer"]["peak_bytes"], 1)
        out["masked_over_sparse_peak"] = ms["sw_mlp_masked"]["peak_bytes"] / max(ms["sw_mlp_sparse"]["peak_bytes"], 1)
    if "step_seconds" in ms.get("rp_mixer", {}) and "step_seconds" in ms.get("mixer", {}):
        out["rp_over_mixer_time"] = ms["rp_mixer"]["step_seconds"] / ms["mixer"]["step_seconds"]
        out["rp_flops_equal_mixer"] = ms["rp_mixer"]["flops_per_step"] == ms["mixer"]["flops_per_step"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smallest configuration only, 2 steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["S16_C32"] if args.quick else list(CONFIGS)
    report: dict[str, Any] = {"benchmark": "memory", "torch": torch.__version__, "threads": args.threads,
                              "loadavg_start": os.getloadavg(), "configs": {},
                              "mixer_b16": masked_sw_mlp_memory(196, 768, 384, 3072, 12)}
    for name in names:
        report["configs"][name] = run_config(name, CONFIGS[name], 2 if args.quick else 3)
    report["loadavg_end"] = os.getloadavg()
    print(f"{'config':<9} {'model':<14} {'params':>10} {'connections':>12} {'GFLOP':>8} {'step ms':>8} {'peak MiB':>9}")
    for name, res in report["configs"].items():
        for label, r in res["models"].items():
            if "error" in r:
                print(f"{name:<9} {label:<14} error: {r['error'][-120:]}")
                continue
            print(f"{name:<9} {label:<14} {r['params']:>10,} {r['connections']:>12,} {r['flops_per_step'] / 1e9:>8.3f} "
                  f"{1e3 * r['step_seconds']:>8.1f} {r['peak_bytes'] / 2**20:>9.1f}")
    b16 = report["mixer_b16"]
    print(f"Mixer-B/16 matched masked SW-MLP: {b16['dense_weights']:.3e} dense weights; fp32 weights "
          f"{b16['sw_mlp_bytes']['weights'] / 1e12:.1f} TB, weights + fp32 mask "
          f"{b16['sw_mlp_bytes']['weights_float_mask'] / 2**40:.2f} TiB (paper: 23.2 TB); Mixer mixing weights "
          f"{b16['mixer_bytes']['weights'] / 1e6:.1f} MB (paper: 26.3 MB)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
