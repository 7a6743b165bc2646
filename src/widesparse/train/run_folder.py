"""The run folder of a training run: its unique name, and the models read back from it.

:mod:`widesparse.train.engine` re-exports these names. Imports the model registry. A run folder holds
``config.json`` (the config, the resolved model kwargs, the data set's info), ``model.pt`` (the final
``state_dict``), ``metrics.jsonl``/``.csv``, ``summary.json`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widesparse.models import create_model
from widesparse.train.checkpoint import CheckpointError, read_torch_file

__all__ = ["init_model", "load_run", "make_run_dir"]


def make_run_dir(out_dir: str | os.PathLike[str], run_name: str) -> Path:
    """Create ``out_dir/run_name``, or ``run_name-1``, ``-2``, ... if taken; never reuses a folder."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        path = root / (run_name if i == 0 else f"{run_name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name for {run_name!r} in {root}")


def load_run(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model of a run folder (``config.json`` + ``model.pt``); returns ``(model, config)``."""
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "model.pt"
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished run folder of `widesparse train`")
    saved = json.loads(cfg_path.read_text())
    model = _model_of(saved)
    state = read_torch_file(weights, "weights")
    if not isinstance(state, dict):
        raise CheckpointError(f"weights {weights} cannot be read: it holds a {type(state).__name__}, not a state dict")
    model.load_state_dict(state)
    return model.to(device).eval(), saved


def init_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The model of a run folder as it was before training (the train loop seeds right before building it)."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir} is not a run folder of `widesparse train`")
    saved = json.loads(cfg_path.read_text())
    torch.manual_seed(saved["config"]["seed"])
    return _model_of(saved).to(device).eval()


def _model_of(saved: dict[str, Any]) -> nn.Module:
    info = saved["dataset"]
    kwargs = {"num_classes": info["num_classes"], "image_size": info["image_size"], "in_chans": info["in_chans"]}
    return create_model(saved["config"]["model"], **{**kwargs, **saved["model_kwargs"]})
