"""Memory, FLOP and time accounting of one training step (docs/theory.md E10), measured and analytic.

* :func:`measure_step`: parameters, connections, FLOPs (``torch.utils.flop_counter``), median step time and
  peak memory of ``forward + backward + AdamW`` for any registered model. On the CPU the peak is the peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before building,
  measured in a fresh child process (``isolate=True``) so that nothing else of the caller counts; on a GPU it
  is ``torch.cuda.max_memory_allocated``.
* :func:`masked_sw_mlp_memory`: bytes of the dense-masked SW-MLP matched to a Mixer (docs/theory.md §3, (10)) and of
  the Mixer itself, under several countings, beside the paper's 23.2 TB vs 26.3 MB (E10).

The ``/proc`` helpers (:func:`status_bytes`, :func:`reset_peak_rss`, :func:`trim_heap`) are Linux-only and
degrade to "unknown" (0 / ``False``) elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widesparse.layers.base import StructuredLinear
from widesparse.models.registry import create_model

__all__ = [
    "status_bytes",
    "reset_peak_rss",
    "trim_heap",
    "count_connections",
    "step_flops",
    "measure_step",
    "masked_sw_mlp_memory",
    "PAPER_E10",
]

PAPER_E10 = {"sw_mlp_bytes": 23.2e12, "mixer_bytes": 26.3e6}  # docs/theory.md E10, as printed ("23.2 TB", "26.3 MB")
_PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------------------- /proc helpers
def status_bytes(key: str) -> int:
    """``VmRSS``/``VmHWM``/... of this process in bytes from ``/proc/self/status`` (0 where unavailable)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{re.escape(key)}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if found is None:
        raise KeyError(f"/proc/self/status has no field {key!r}; valid: VmRSS, VmHWM, VmPeak, VmSize, ...")
    return int(found.group(1)) * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (``echo 5 > /proc/self/clear_refs``); ``False`` if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so freed temporaries leave the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------ counting
def count_connections(model: nn.Module) -> dict[str, int]:
    """Connections of a model: ``structured`` (sum of :attr:`StructuredLinear.connections`, i.e. mask non-zeros
    for masked and sparse layers) and ``dense`` (weights of the plain ``nn.Linear``/``nn.Conv*`` layers: stem
    and head)."""
    structured = dense = 0
    for mod in model.modules():
        if isinstance(mod, StructuredLinear):
            structured += int(mod.connections)
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            dense += mod.weight.numel()
    return {"structured": structured, "dense": dense}


def _autocast(device: str, precision: str) -> torch.autocast:
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(_PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, precision: str) -> torch.Tensor:
    with _autocast(device, precision):
        return nn.functional.cross_entropy(model(x), y)


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> int:
    """FLOPs of one forward + backward pass as ``torch.utils.flop_counter.FlopCounterMode`` counts them
    (matrix products and convolutions; elementwise work and the optimizer are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _loss(model, x, y, str(x.device), precision).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ measuring
def _inputs(batch: int, in_chans: int, image: int, classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, image, image, generator=g).to(device)
    return x, torch.randint(0, max(classes, 1), (batch,), generator=g).to(device)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_rss() -> int:
    """Peak resident bytes: VmHWM, or VmRSS when larger (the kernel updates the high-water mark lazily, so right
    after a reset it can lag behind the current RSS)."""
    return max(status_bytes("VmHWM"), status_bytes("VmRSS"))


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_step` in this process (the child's body when isolated)."""
    name, kw, dev, prec = spec["model_name"], spec["model_kwargs"], spec["device"], spec["precision"]
    sizes = {"image_size": spec["image_size"], "in_chans": spec["in_chans"], "num_classes": spec["num_classes"]}
    cuda = torch.device(dev).type == "cuda"
    # warm the kernels (GEMM, AdamW, allocator arenas) on a batch of 2 before taking the baseline
    warm = create_model(name, **{**sizes, **kw}, device=dev)
    w_opt = torch.optim.AdamW(warm.parameters(), lr=1e-3)
    _loss(warm, *_inputs(2, spec["in_chans"], spec["image_size"], spec["num_classes"], dev), dev, prec).backward()
    w_opt.step()
    del warm, w_opt
    trim_heap()
    base = torch.cuda.memory_allocated() if cuda else status_bytes("VmRSS")
    exact = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = create_model(name, **{**sizes, **kw}, device=dev)
    build_peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x, y = _inputs(spec["batch_size"], spec["in_chans"], spec["image_size"], spec["num_classes"], dev)
    trim_heap()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        _sync(dev)
        t0 = time.perf_counter()
        loss = _loss(model, x, y, dev, prec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base
    conn = count_connections(model)
    return {
        "model": name, "model_kwargs": kw, "batch_size": spec["batch_size"], "precision": prec, "device": dev,
        "params": sum(p.numel() for p in model.parameters()), "connections": conn["structured"],
        "dense_connections": conn["dense"], "flops_per_step": step_flops(model, x, y, prec),
        "step_seconds": statistics.median(times), "step_seconds_all": times, "peak_bytes": peak,
        "build_peak_bytes": build_peak, "baseline_bytes": base, "peak_reset_exact": exact or cuda,
        "memory_method": "cuda max_memory_allocated" if cuda else "VmHWM minus VmRSS before building",
        "threads": torch.get_num_threads(), "loss": float(loss.detach()),
    }


def measure_step(
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    batch_size: int,
    image_size: int,
    in_chans: int,
    num_classes: int,
    precision: str = "fp32",
    steps: int = 3,
    device: str = "cpu",
    isolate: bool = True,
) -> dict[str, Any]:
    """Measure ``steps`` training steps (forward + backward + AdamW) of a registered model (docs/theory.md E10).

    Returns ``params``, ``connections`` (structured connections; ``dense_connections`` for stem and head),
    ``flops_per_step`` (forward + backward, FlopCounterMode), ``step_seconds`` (median), ``peak_bytes`` (the
    training steps' peak over the memory before building: parameters, gradients, AdamW state, masks, activations,
    temporaries) and ``build_peak_bytes`` (building alone). ``isolate=True`` runs in a fresh Python process, with
    this process's thread count; the caller's own allocations then do not count.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(_PRECISIONS)}")
    for label, v in (("batch_size", batch_size), ("image_size", image_size), ("in_chans", in_chans),
                     ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")
    spec = {"model_name": model_name, "model_kwargs": dict(model_kwargs), "batch_size": batch_size,
            "image_size": image_size, "in_chans": in_chans, "num_classes": num_classes, "precision": precision,
            "steps": steps, "device": device}
    if not isolate:
        return _measure_here(spec)
    code = ("import json, sys, torch; from widesparse.analysis.profiling import _measure_here; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            "print(json.dumps(_measure_here(json.loads(sys.argv[1]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"measure_step({model_name!r}) child failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ analytic
def masked_sw_mlp_memory(
    S: int, C: int, token_hidden: int, channel_hidden: int, depth: int, *, dtype_bytes: int = 4
) -> dict[str, Any]:
    """Bytes of the dense-masked SW-MLP matched to a Mixer (S tokens, C channels, D_S, D_C, depth) and of the Mixer.

    The matched SW-MLP (docs/theory.md §3, (5)-(6), (10)) has width ``m = S*C`` and, per block, the effective layers
    ``m -> C*D_S -> m`` (token position) and ``m -> S*D_C -> m`` (channel position), stored dense with a mask.
    Countings (``dtype_bytes`` per value, bool masks 1 byte): ``weights``; ``weights_bool_mask``;
    ``weights_float_mask`` (mask in the weight dtype); ``training`` (weight, gradient, two AdamW moments, bool
    mask). The Mixer's side counts its small mixing matrices (``mixer_mixing_weights``) and all its mixing
    parameters with biases, alone and with gradient + AdamW. ``paper_comparison`` gives, for each counting, the
    ratio to the paper's 23.2 TB and 26.3 MB in decimal (TB, MB) and binary (TiB, MiB) units.
    """
    for label, v in (("S", S), ("C", C), ("token_hidden", token_hidden), ("channel_hidden", channel_hidden),
                     ("depth", depth), ("dtype_bytes", dtype_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")
    m = S * C
    tok_hidden, ch_hidden = C * token_hidden, S * channel_hidden
    layer_weights = {"token_fc1": tok_hidden * m, "token_fc2": m * tok_hidden,
                     "channel_fc1": ch_hidden * m, "channel_fc2": m * ch_hidden}
    dense = depth * sum(layer_weights.values())
    biases = depth * (tok_hidden + m + ch_hidden + m)
    b = dtype_bytes
    sw = {
        "weights": dense * b,
        "weights_bool_mask": dense * (b + 1),
        "weights_float_mask": dense * 2 * b,
        "training": dense * (4 * b + 1),
    }
    mixer_w = depth * (2 * S * token_hidden + 2 * C * channel_hidden)
    mixer_p = mixer_w + depth * (token_hidden + S + channel_hidden + C)
    mixer = {"weights": mixer_w * b, "weights_and_biases": mixer_p * b, "training": mixer_p * 4 * b}
    comparison = {  # measured / paper, reading the paper's "TB"/"MB" as decimal or as binary (TiB, MiB) units
        "sw_mlp": {k: {"decimal": v / PAPER_E10["sw_mlp_bytes"], "binary": v / (23.2 * 2**40)} for k, v in sw.items()},
        "mixer": {k: {"decimal": v / PAPER_E10["mixer_bytes"], "binary": v / (26.3 * 2**20)} for k, v in mixer.items()},
    }
    return {
        "S": S, "C": C, "token_hidden": token_hidden, "channel_hidden": channel_hidden, "depth": depth,
        "dtype_bytes": b, "width": m, "hidden": {"token": tok_hidden, "channel": ch_hidden},
        "layer_weights": layer_weights, "dense_weights": dense, "effective_biases": biases,
        "connections": depth * 2 * m * (token_hidden + channel_hidden),
        "sw_mlp_bytes": sw, "mixer_mixing_weights": mixer_w, "mixer_mixing_params": mixer_p,
        "mixer_bytes": mixer, "paper_comparison": comparison,
    }
