"""The training engine: one data set on the device, one model from the registry, one run folder.

Imports :mod:`widesparse.data.datasets`, :mod:`widesparse.data.augment`, the model registry,
:mod:`widesparse.ops.heap` (the CPU heap setting), and its helpers :mod:`widesparse.train.config` (``TrainConfig``),
:mod:`widesparse.train.feed` (where batches come from), :mod:`widesparse.train.recipe` (optimizer groups, schedule,
evaluation), :mod:`widesparse.train.checkpoint`, :mod:`widesparse.train.metrics`, :mod:`widesparse.train.distributed`
and :mod:`widesparse.train.run_folder`.

Recipe: AdamW (weight decay only on parameters with ``ndim >= 2``, none on biases and norms), linear warmup
then cosine decay to zero, stepped per batch; cross-entropy with optional label smoothing; optional gradient
clipping, bf16 autocast and ``torch.compile``. The images stay ``uint8`` on the device; each batch is
gathered, cropped/flipped (the data set's defaults, ``augment=False`` turns them off) and normalised there.
A large image folder (ImageNet) streams instead: DataLoader workers decode it per batch
(:mod:`widesparse.train.feed`, ``stream``, ``num_workers``). On CUDA the normalised input of a model with a
convolutional patch embedding is ``channels_last`` (``channels_last=None``; cuDNN's fast layout). Not on the
CPU by default: there the patch convolution alone gains, but whole training steps were not consistently faster
(docs/speed.md, layouts).

Reproducibility: the order and augmentation of epoch ``e`` are drawn from a generator seeded by
``(seed, e)``, so they do not depend on history. A run folder ``out_dir/run_name`` (never overwritten: a
taken name gets ``-1``, ``-2``, ...) receives ``config.json``, ``metrics.jsonl`` and ``metrics.csv`` (one
row per epoch), ``checkpoint.pt`` (atomically replaced after every epoch and on Ctrl-C), ``summary.json``
and ``model.pt`` (the final ``state_dict``). ``resume=RUN_DIR`` continues from ``checkpoint.pt`` and ends
with the same metrics as an uninterrupted run.

Data parallel: under ``torchrun`` every process trains its share of each global batch (``batch_size`` is
the global batch) through ``DistributedDataParallel``; rank 0 alone logs and writes files
(:mod:`widesparse.train.distributed`).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from widesparse.data.augment import normalize
from widesparse.data.datasets import DatasetInfo
from widesparse.models import create_model, model_defaults
from widesparse.ops.heap import keep_freed_memory
from widesparse.train import distributed
from widesparse.train.checkpoint import (
    DeferredInterrupt,
    atomic_write,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from widesparse.train.config import RESUME_OVERRIDABLE, TrainConfig
from widesparse.train.device import check_device
from widesparse.train.feed import Feed, SplitName, epoch_seed, open_feed
from widesparse.train.metrics import MetricsLog
from widesparse.train.recipe import autocast, eval_sums_batches, evaluate, param_groups, warmup_cosine
from widesparse.train.run_folder import init_model, load_run, make_run_dir

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "evaluate",
    "init_model",
    "load_run",
    "make_run_dir",
    "param_groups",
    "resolve_model_kwargs",
    "train",
    "warmup_cosine",
]

CHECKPOINT = "checkpoint.pt"
METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_err", "lr",
    "epoch_seconds", "train_seconds", "eval_seconds", "images_per_s", "wall_seconds",
)  # fmt: skip
STOP_CHECK_EVERY = 20  # steps between the ranks' agreement on a Ctrl-C in a distributed run
TIMING_KEYS = frozenset({"epoch_seconds", "train_seconds", "eval_seconds", "images_per_s", "wall_seconds"})


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last checkpoint is the last good state."""


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("widesparse")
    except PackageNotFoundError:
        return None


def resolve_model_kwargs(config: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """Model keyword arguments for ``config`` on data set ``info`` (its size, channels and classes win).

    Patch size: the user's, else the preset's, else the data set's default. A user-given ``image_size``,
    ``in_chans`` or ``num_classes`` that contradicts the data raises ``ValueError`` naming both.
    """
    data_fixed = {"image_size": info.image_size, "in_chans": info.in_chans, "num_classes": info.num_classes}
    for key, want in data_fixed.items():
        given = config.model_kwargs.get(key)
        if given is not None and given not in (want, (want, want), [want, want]):
            raise ValueError(
                f"model {key}={given!r} does not fit data set {info.name!r}, which has {key}={want} "
                f"({info.image_size}x{info.image_size} images, {info.in_chans} channel(s), {info.num_classes} classes)"
            )
    kwargs: dict[str, Any] = {"patch_size": model_defaults(config.model).get("patch_size", info.default_patch_size)}
    kwargs.update(info.default_model_kwargs)
    kwargs.update(config.model_kwargs)
    kwargs.setdefault("seed", config.seed)
    kwargs.update(data_fixed)
    return kwargs


_epoch_seed = epoch_seed  # the name the tests and older callers use


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.model`` on ``config.dataset``; write the run folder; return the summary dict.

    On the CPU this also sets glibc's heap to keep freed memory for reuse, process-wide
    (:func:`widesparse.ops.matmul.keep_freed_memory`): fresh pages are written at a fifth of the speed.

    Raises:
        NonFiniteLossError: The loss became NaN/Inf (the message names the step and the last good checkpoint).
        KeyboardInterrupt: After Ctrl-C, once a checkpoint of the last finished step is written.
    """
    ckpt = None
    if config.resume:
        path = Path(config.resume) / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} not found ({config.resume} is not a run folder)")
        ckpt = load_checkpoint(path)
        config = TrainConfig.from_dict({**ckpt["config"], **{k: getattr(config, k) for k in RESUME_OVERRIDABLE}})
    config.validate()
    check_device(config.device)  # one clear line before anything starts
    old_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    d, device = distributed.setup(config.device)
    if device.type == "cpu":
        keep_freed_memory()  # fresh pages fault at a fifth of the write speed of reused ones (widesparse.ops.matmul)
    try:
        summary = _Trainer(config, ckpt, d, device).run()
        # No rank leaves (and destroys its process group) while rank 0 still writes: seen to abort a rank at exit.
        d.barrier()
        return summary
    finally:
        distributed.teardown(d)
        torch.set_num_threads(old_threads)


_FUSED_ADAMW = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _Trainer:
    """One run (one rank's part of it): set up from a config (and a checkpoint when resuming), then :meth:`run`."""

    def __init__(self, config: TrainConfig, ckpt: dict[str, Any] | None, d: distributed.Dist, device: torch.device):
        self.t_start = time.perf_counter()
        self.config = c = config
        self.dist, self.device = d, device
        torch.manual_seed(c.seed)
        self.feed: Feed = open_feed(
            c.dataset, data_dir=c.data_dir, seed=c.seed, image_size=c.image_size, download=c.download, device=device,
            d=d, batch_size=c.batch_size, augment=c.augment, stream=c.stream, crop=c.train_crop,
            num_workers=c.num_workers,
        )  # fmt: skip
        self.info = self.feed.info
        self.n = n = self.feed.num_train
        self.model_kwargs = resolve_model_kwargs(c, self.info)
        torch.manual_seed(c.seed)  # again, right before the model: `init_model(run_dir)` rebuilds these weights
        self.model = create_model(c.model, **self.model_kwargs).to(device)
        stem = getattr(getattr(self.model, "stem", None), "proj", None)
        auto_cl = isinstance(stem, nn.Conv2d) and device.type == "cuda"
        self.channels_last = auto_cl if c.channels_last is None else c.channels_last
        self.forward: nn.Module = self.model
        if d.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        if c.compile:
            self.forward = torch.compile(self.forward)
        self.steps_per_epoch = math.ceil(n / c.batch_size)
        # fused: one kernel for all parameters (CPU and CUDA) instead of the for-loop default's many small ones;
        # several times faster per step on the CPU (docs/speed.md, the optimizer step)
        fused = device.type in ("cpu", "cuda") and all(p.dtype in _FUSED_ADAMW for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, c.weight_decay), lr=c.lr, fused=fused or None)
        total, warmup = c.epochs * self.steps_per_epoch, c.warmup_epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total, warmup))
        # Restorable progress: epochs finished, steps done in the next one (with its partial sums), history.
        self.epochs_done, self.step, self.partial, self.seconds_before = 0, 0, None, 0.0
        self.history: list[dict[str, Any]] = []
        if ckpt is not None:
            self.run_dir = Path(c.resume)  # type: ignore[arg-type]
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            ranks = ckpt.get("rng_ranks") or []  # every rank's own RNG (drop path draws differ per rank)
            set_rng_state(ranks[d.rank] if len(ranks) == d.world else ckpt["rng"])
            self.epochs_done, self.step, self.partial = ckpt["epochs_done"], ckpt["step"], ckpt["partial"]
            self.history, self.seconds_before = ckpt["history"], ckpt["seconds"]
            self.say(f"resuming {self.run_dir} after epoch {self.epochs_done}, step {self.step}")
        else:
            name = c.run_name or f"{c.model}-{c.dataset}-s{c.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.run_dir = Path(d.broadcast(str(make_run_dir(c.out_dir, name)) if d.is_main else None))
            if d.is_main:
                write_json(self.run_dir / "config.json", {
                    "config": c.to_dict(), "model_kwargs": self.model_kwargs,
                    "params": sum(p.numel() for p in self.model.parameters()), "dataset": self.info.to_dict(),
                    "num_train": n, "num_test": self.feed.num_test, "torch_version": torch.__version__,
                    "widesparse_version": _package_version(), "num_threads": torch.get_num_threads(),
                    "world_size": d.world, "streaming": self.feed.streaming, "channels_last": self.channels_last,
                    "num_workers": getattr(self.feed, "num_workers", None),
                })  # fmt: skip

    def say(self, msg: str) -> None:
        """A message on stderr, from rank 0 only."""
        if self.dist.is_main:
            print(msg, file=sys.stderr)

    def prepare(self, x: Tensor) -> Tensor:
        """``uint8`` images to the model's normalised float input (``channels_last`` for a convolutional stem)."""
        x = normalize(x, self.info.mean, self.info.std, self.info.pixel_max)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start

    def save(self) -> None:
        """Atomically write ``checkpoint.pt`` with everything a resume needs (all ranks call it; rank 0 writes)."""
        rng = get_rng_state()
        ranks = self.dist.gather(rng) if self.dist.enabled else None
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / CHECKPOINT, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": None,  # bf16 autocast needs no gradient scaler
            "rng": rng, "rng_ranks": ranks, "epochs_done": self.epochs_done, "step": self.step, "partial": self.partial,
            "history": self.history, "seconds": self.elapsed(), "config": self.config.to_dict(),
            "model_kwargs": self.model_kwargs,
        })  # fmt: skip

    def run(self) -> dict[str, Any]:
        c, n, d = self.config, self.n, self.dist
        show = (sys.stderr.isatty() if c.progress is None else c.progress) and d.is_main
        bar = tqdm(
            total=c.epochs * n, initial=self.epochs_done * n + min(self.step * c.batch_size, n), unit="img",
            unit_scale=True, desc=self.run_dir.name, disable=not show, file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip
        log_to = MetricsLog(self.run_dir, METRIC_COLUMNS, self.history, c.tensorboard) if d.is_main else nullcontext()
        with (
            log_to as log,
            bar,
            DeferredInterrupt() as interrupt,
        ):
            try:
                self._epochs(log, bar, interrupt)
                return self.finish()
            finally:
                self.feed.close()

    def _epochs(self, log: MetricsLog | None, bar: tqdm, interrupt: DeferredInterrupt) -> None:
        """Train the remaining epochs; after each, a checkpoint and a metrics row (rank 0)."""
        c, d = self.config, self.dist
        for epoch in range(self.epochs_done + 1, c.epochs + 1):
            row = self.train_epoch(epoch, interrupt, bar)
            self.history.append(row)
            self.epochs_done, self.step, self.partial = epoch, 0, None
            self.save()
            if log is not None:
                log.write(row)
            bar.set_postfix(epoch=epoch, loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_acc']:.3f}")
            if d.any(interrupt.requested, self.device):
                self.say(f"\ninterrupted after epoch {epoch}; resume with --resume {self.run_dir}")
                raise KeyboardInterrupt

    def train_epoch(self, epoch: int, interrupt: DeferredInterrupt, bar: tqdm) -> dict[str, Any]:
        """One epoch from ``self.step`` on, then the test evaluation; returns the metrics row."""
        c, n, device, bs, d = self.config, self.n, self.device, self.config.batch_size, self.dist
        t0 = time.perf_counter()
        batches = self.feed.train_batches(epoch, self.step)
        losses = torch.zeros(self.steps_per_epoch, dtype=torch.float64, device=device)  # per-batch loss sums
        correct = torch.zeros((), dtype=torch.int64, device=device)
        t_before = 0.0
        if self.partial is not None:  # resuming in the middle of this epoch; the sums are global: rank 0 holds them
            if d.is_main:
                losses[: self.step] = self.partial["losses"].to(device)
                correct += int(self.partial["correct"])
            t_before = float(self.partial["train_seconds"])
        # A sync per step is free on one CPU process; elsewhere non-finite losses are caught at the epoch's end.
        check_every_step = device.type == "cpu" and not d.enabled
        self.model.train()
        for step in range(self.step, self.steps_per_epoch):
            # Ranks agree on Ctrl-C every STOP_CHECK_EVERY steps (one process: every step).
            if (interrupt.requested if not d.enabled else step % STOP_CHECK_EVERY == 0 and d.any(
                    interrupt.requested, device)):  # fmt: skip
                done = d.all_sum(losses[:step].clone())
                self._check_finite(done, epoch)
                self.step, self.partial = step, {
                    "losses": done.cpu(), "correct": int(d.all_sum(correct.clone()).item()),
                    "train_seconds": t_before + time.perf_counter() - t0,
                }  # fmt: skip
                self.save()
                self.say(f"\ninterrupted: checkpoint written; continue with --resume {self.run_dir}")
                raise KeyboardInterrupt
            xb, yb = next(batches)  # this rank's share of the global batch
            batch = min((step + 1) * bs, n) - step * bs
            with autocast(device, c.precision):
                logits = self.forward(self.prepare(xb))
            loss_sum = F.cross_entropy(logits.float(), yb, label_smoothing=c.label_smoothing, reduction="sum")
            # DDP averages gradients over ranks: this scaling makes the result the global batch mean.
            loss = loss_sum * (d.world / batch)
            losses[step] = loss_sum.detach().double()
            if check_every_step:
                self._check_finite(losses[step : step + 1], epoch, offset=step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            bar.update(batch)
        d.all_sum(losses)
        d.all_sum(correct)
        self._check_finite(losses, epoch)
        t_train = t_before + time.perf_counter() - t0
        t1 = time.perf_counter()
        test_loss, test_acc = self.evaluate("test")
        t_eval = time.perf_counter() - t1
        return {
            "epoch": epoch, "train_loss": losses.sum().item() / n, "train_acc": correct.item() / n,
            "test_loss": test_loss, "test_acc": test_acc, "test_err": 1.0 - test_acc,
            "lr": self.optimizer.param_groups[0]["lr"],  # after the epoch's last step
            "epoch_seconds": t_train + t_eval, "train_seconds": t_train, "eval_seconds": t_eval,
            "images_per_s": n / t_train, "wall_seconds": self.elapsed(),
        }  # fmt: skip

    def _check_finite(self, losses: Tensor, epoch: int, offset: int = 0) -> None:
        """Raise :class:`NonFiniteLossError` naming the first non-finite batch loss in ``losses``."""
        bad = (~torch.isfinite(losses)).nonzero()
        if not len(bad):
            return
        step = offset + int(bad[0, 0])
        last = (
            f"the last good checkpoint is {self.run_dir / CHECKPOINT} (after epoch {self.history[-1]['epoch']})"
            if self.history
            else "no checkpoint was written (the first epoch did not finish)"
        )
        raise NonFiniteLossError(
            f"non-finite loss {losses[step - offset].item()} at epoch {epoch}, step {step} (global step "
            f"{(epoch - 1) * self.steps_per_epoch + step}); lr {self.optimizer.param_groups[0]['lr']:.3g}; the run "
            f"stopped; {last}. Lower the lr, set grad_clip, or use precision='fp32'"
        )

    def evaluate(self, split: SplitName) -> tuple[float, float]:
        """Mean loss and accuracy of ``split`` in eval mode: each rank its shard, the sums added over ranks."""
        batches = self.feed.eval_batches(split)
        sums = eval_sums_batches(self.forward, batches, self.device, self.prepare, self.config.precision)
        loss_sum, correct, n = self.dist.all_sum(sums)
        return (loss_sum / n).item(), (correct / n).item()

    def finish(self) -> dict[str, Any]:
        """Final train accuracy, ``model.pt``, ``summary.json``; the summary.

        The train accuracy is measured in eval mode on the whole train split (``final_train_eval``; by default
        unless streaming), else it is the last epoch's running mean over its augmented batches.
        """
        c, history, d = self.config, self.history, self.dist
        full = not self.feed.streaming if c.final_train_eval is None else c.final_train_eval
        if full:
            train_loss, train_acc = self.evaluate("train")
        else:
            train_loss, train_acc = history[-1]["train_loss"], history[-1]["train_acc"]
        last, best = history[-1], max(history, key=lambda r: r["test_acc"])
        train_seconds = sum(r["train_seconds"] for r in history)
        summary = {
            "run_dir": str(self.run_dir), "model": c.model, "dataset": c.dataset, "seed": c.seed,
            "epochs": c.epochs, "params": sum(p.numel() for p in self.model.parameters()),
            "test_acc": last["test_acc"], "test_err": last["test_err"], "test_loss": last["test_loss"],
            "train_acc": train_acc, "train_loss": train_loss, "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"], "seconds": self.elapsed(), "train_seconds": train_seconds,
            "images_per_s": self.n * len(history) / train_seconds,
            "train_acc_from": "final_eval" if full else "last_epoch",
        }  # fmt: skip
        if d.is_main:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            atomic_write(self.run_dir / "model.pt", lambda f: torch.save(state, f), mode="wb")
            write_json(self.run_dir / "summary.json", summary)
            print(
                f"test accuracy {100 * summary['test_acc']:.2f}% (error {100 * summary['test_err']:.2f}%) after "
                f"{c.epochs} epochs in {summary['seconds']:.1f} s; run folder {self.run_dir}"
            )
        return summary
