"""Mixer-B/16 training throughput on a GPU: widesparse Mixer / RP-Mixer vs timm, bf16, torch.compile.

Workload (the GPU target): Mixer-B/16 (224 px, patch 16, S = 196, C = 768, depth 12, token hidden 384,
channel hidden 3072, 1000 classes: 59,880,472 parameters in every model, asserted before timing), batch 256,
bf16 autocast with fp32 master weights, forward + backward + AdamW, every model under ``torch.compile``. The
models take their steps in rounds, so clock or thermal drift hits all alike; the median step of each is kept.
MFU is against the GPU's bf16 matmul peak measured in the same run (8192^3).

    python benchmarks/bench_mixer_gpu.py [--batch 256] [--rounds 5] [--steps 10] [--no-compile] [--out PATH]
    python benchmarks/bench_mixer_gpu.py --tiny      # a small configuration on any device (CI runs it on the CPU)

timm is imported in-process (``pip install timm``, which needs torchvision); without it its row reads
"timm not installed" and the RP-Mixer / Mixer ratio is still measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_mixer import step_flops  # noqa: E402  (the same FLOP formula as the CPU benchmark)

B16 = {"image_size": 224, "patch_size": 16, "in_chans": 3, "dim": 768, "depth": 12, "token_hidden": 384,
       "channel_hidden": 3072, "num_classes": 1000, "batch": 256}
TINY = {"image_size": 32, "patch_size": 8, "in_chans": 3, "dim": 32, "depth": 2, "token_hidden": 8,
        "channel_hidden": 128, "num_classes": 10, "batch": 8}


def build(w: dict, device: str, with_timm: bool) -> tuple[dict[str, nn.Module], str | None]:
    """Our Mixer and RP-Mixer and (if importable) timm's MlpMixer at the workload's widths, same parameter count."""
    from widesparse.models import create_model

    kw = {k: v for k, v in w.items() if k != "batch"}
    # Mixer-B/16's widths: token hidden = C/2, channel hidden = 4C; ours takes them as expansions of S and C
    kw.update(token_expansion=w["token_hidden"] / ((w["image_size"] // w["patch_size"]) ** 2),
              channel_expansion=w["channel_hidden"] / w["dim"])
    del kw["token_hidden"], kw["channel_hidden"]
    models = {n: create_model(n, **kw).to(device) for n in ("mixer", "rp_mixer")}
    note = None
    if with_timm:
        try:
            from timm.models.mlp_mixer import MlpMixer

            models["timm"] = MlpMixer(num_classes=w["num_classes"], img_size=w["image_size"], in_chans=w["in_chans"],
                                      patch_size=w["patch_size"], num_blocks=w["depth"], embed_dim=w["dim"],
                                      mlp_ratio=(w["token_hidden"] / w["dim"], w["channel_hidden"] / w["dim"])
                                      ).to(device)
        except Exception as e:  # noqa: BLE001  (timm needs torchvision, which may not import)
            note = f"timm not installed ({type(e).__name__}: {e})"
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    if len(set(counts.values())) != 1:
        raise AssertionError(f"parameter counts differ, configurations are not equal: {counts}")
    return models, note


def time_models(models: dict[str, nn.Module], w: dict, device: str, compile_: bool, rounds: int,
                steps: int) -> dict[str, list[float]]:
    """Per-step seconds of each model: ``rounds`` rounds of ``steps`` steps each, models in turn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(w["batch"], w["in_chans"], w["image_size"], w["image_size"], generator=g).to(device)
    y = torch.randint(0, w["num_classes"], (w["batch"],), generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda")
        fwd = torch.compile(m) if compile_ else m

        def step(fwd=fwd, opt=opt) -> None:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):  # compile and warm up
            step()
        fns[name] = step
    sync()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, step in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[name].append((time.perf_counter() - t) / steps)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small configuration (checks the script on any device)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile every model (default: on with CUDA, off on the CPU)")
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "mixer-gpu.json"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        ap.error("no CUDA device: this benchmark needs a GPU (use --tiny to check it on the CPU)")
    w = dict(TINY if args.tiny else B16)
    if args.batch:
        w["batch"] = args.batch
    compile_ = device == "cuda" if args.compile is None else args.compile
    from widesparse.ops.matmul import gemm_peaks

    peak = max(gemm_peaks(torch.bfloat16, device, n=1024 if args.tiny else 8192, reps=3).values())
    models, note = build(w, device, not args.no_timm)
    times = time_models(models, w, device, compile_, args.rounds, args.steps)
    flops = step_flops(w)
    runs = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        runs[name] = {"step_s": s, "images_per_s": w["batch"] / s, "mfu": flops / s / 1e9 / peak, "rounds": ts}
    ratios = {"rp_mixer_vs_mixer": runs["mixer"]["step_s"] / runs["rp_mixer"]["step_s"]}
    if "timm" in runs:
        ratios["mixer_vs_timm"] = runs["timm"]["step_s"] / runs["mixer"]["step_s"]
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "workload": w, "compiled": compile_, "params": sum(p.numel() for p in models["mixer"].parameters()),
              "step_gflop": flops / 1e9, "bf16_peak_gflops": peak, "runs": runs, "ratios": ratios,
              "timm": note or "in-process"}
    print(f"{result['device']}: bf16 peak {peak / 1e3:.0f} TFLOP/s, step {flops / 1e12:.2f} TFLOP, "
          f"compiled={compile_}")
    for name, r in runs.items():
        print(f"{name:<10} {1e3 * r['step_s']:9.1f} ms/step {r['images_per_s']:9.0f} img/s  MFU {r['mfu']:6.1%}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + (f"  ({note})" if note else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
