"""Whether a requested device can be used here, checked before anything starts, with one clear line if not."""

from __future__ import annotations

import os

import torch

__all__ = ["DeviceError", "check_device"]


class DeviceError(ValueError):
    """A device the installed torch cannot use on this machine (the message says why and what to do)."""


def check_device(device: str | torch.device | None) -> torch.device:
    """``torch.device(device)`` (default CPU) after checking that torch can use it here.

    CUDA: the build must have CUDA, a GPU must be visible and the index must be below the GPU count; MPS: the
    backend must be available. Raises :class:`DeviceError` naming the device, torch's version and the fix.
    """
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r} ({e}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError(f"{device} requested but this torch build has no CUDA (torch {torch.__version__}); "
                              "install a CUDA build of torch or use --device cpu")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise DeviceError(f"{device} requested but no GPU is visible{where}; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{device} requested but only {count} GPU{'s' if count > 1 else ''} "
                              f"{'are' if count > 1 else 'is'} visible (cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"{device} requested but the MPS backend is not available here; use --device cpu")
    return dev
