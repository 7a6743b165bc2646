"""Data parallelism for the training engine on ``torch.distributed``: one process per device, under ``torchrun``.

Imports nothing from ``widesparse``.

``torchrun --nproc-per-node N -m widesparse train ...`` (or ``--nnodes``/``--rdzv-*`` for several machines)
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`setup` reads them, joins the
process group (NCCL on CUDA, gloo on the CPU) and picks ``cuda:LOCAL_RANK``. Without them it is a no-op and
:class:`Dist` describes a world of one, so the engine has a single code path.

Sharding keeps a distributed run equal to a single-process run with the same (global) batch size: every rank
draws the same epoch order and augmentation (seeded by ``(seed, epoch)``), takes its contiguous share of each
global batch (:meth:`Dist.shard`), and scales its summed loss so that DDP's gradient average is the mean over
the global batch. Metrics are summed over ranks before they are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Dist", "setup", "teardown"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # :func:`setup` created the process group, so :func:`teardown` destroys it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous part of ``x`` (dim 0); parts differ in length by at most one."""
        return torch.tensor_split(x, self.world)[self.rank] if self.enabled else x

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all ranks, in place; returns ``t``."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective: all ranks call it)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment; return it and this rank's device.

    ``device`` is the configured device: ``"cuda"`` becomes ``cuda:LOCAL_RANK`` when distributed; ``"cpu"``
    stays ``cpu`` (gloo backend).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return Dist(), dev
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"device {device!r}: under torchrun give device='cuda'; each rank uses cuda:LOCAL_RANK")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        cuda = dev.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=dev if cuda else None)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"process group has rank {dist.get_rank()} of {dist.get_world_size()}; the environment says {rank} of "
            f"{world}"
        )
    return Dist(rank, world, local_rank, owns), dev


def teardown(d: Dist) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()
