"""The run configuration of the training engine: one dataclass, settable from code, the CLI and files.

Imports only the crop names of :mod:`widesparse.data.loader`. Every field is a CLI option ``--field-name value``
(the CLI builds them from :func:`dataclasses.fields`); ``--config FILE`` reads a ``.toml``, ``.yaml``/``.yml``
or ``.json`` file of fields (or a run folder's ``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widesparse.data.loader import TRAIN_CROPS

__all__ = ["PRECISIONS", "RESUME_OVERRIDABLE", "TrainConfig"]

PRECISIONS = ("fp32", "bf16")
# Fields a resumed run takes from the caller; every other field comes from the checkpoint.
RESUME_OVERRIDABLE = ("resume", "progress", "num_threads", "device", "tensorboard", "num_workers")


@dataclass
class TrainConfig:
    """Everything a run depends on; ``to_dict()`` is what ``config.json`` records.

    The defaults are the digits recipe: the default ``mixer`` (about 1.07M parameters at patch 2 on 8x8)
    reaches about 98-99% test accuracy in 20 epochs, about 30 s on 2 idle CPU cores; accuracy plateaus
    after about 10 epochs. ``num_threads=None`` keeps torch's thread count (on a CPU shared with other
    busy processes, ``num_threads=1`` can be many times faster than 2 spinning threads).

    ``augment`` applies the data set's default crop/flip (``DatasetInfo.crop_padding``/``hflip``; none for
    digits and MNIST). ``precision``: ``"fp32"`` or ``"bf16"`` (autocast, CPU or GPU). ``image_size``:
    resize ``imagefolder`` images (others keep their size). ``tensorboard``: ``None`` logs there when
    installed. ``resume``: a run folder to continue; its saved config wins except for
    ``RESUME_OVERRIDABLE`` fields. ``batch_size`` is the global batch: under ``torchrun`` each of the N
    processes takes ``batch_size / N`` of it. ``compile``: wrap the model in ``torch.compile`` (off by default: on
    the CPU compiled float32 steps are slower than the eager oneDNN route and bf16 gains nothing, see
    docs/speed.md; measure before compiling on a CPU).

    Streaming (``imagefolder`` only): ``stream=None`` streams a folder whose decoded images would exceed
    ``widesparse.train.feed.STREAM_ABOVE_BYTES`` (4 GiB), ``True`` always, ``False`` never (decode it all into
    memory once). ``num_workers``: decoding processes per training process (``None``: the CPUs available,
    at most 8; ``0``: decode in the training process). ``train_crop``: the streamed training crop,
    ``"random_resized"`` (Inception crop) or ``"resize_random"`` (shorter side to size / 0.875, random
    square); with a flip. ``final_train_eval``: measure the final train accuracy on the whole train split in
    eval mode (``None``: unless streaming, where the last epoch's running accuracy is reported instead).
    ``channels_last``: feed a convolutional patch embedding ``channels_last`` input (``None``: on CUDA when the
    model has one).
    """

    model: str = "mixer"
    dataset: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    seed: int = 0
    label_smoothing: float = 0.0
    out_dir: str = "runs"
    run_name: str | None = None
    device: str = "cpu"
    num_threads: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool | None = None  # None: show a progress bar only when stderr is a terminal
    data_dir: str | None = None
    augment: bool = True
    grad_clip: float | None = None
    precision: str = "fp32"
    compile: bool = False
    image_size: int | None = None
    download: bool = False
    tensorboard: bool | None = None
    resume: str | None = None
    stream: bool | None = None
    num_workers: int | None = None
    train_crop: str = "random_resized"
    final_train_eval: bool | None = None
    channels_last: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """A config from a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file of TrainConfig fields."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml), or use .toml/.json") from e
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"config file {path}: unknown format {path.suffix!r}; use .json, .toml or .yaml")
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields")
        return cls.from_dict(data.get("config", data))  # a run folder's config.json nests it under "config"

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_epochs < 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1, warmup_epochs >= 0; got {self.epochs}, "
                f"{self.batch_size}, {self.warmup_epochs}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"unknown train_crop {self.train_crop!r}; valid: {', '.join(TRAIN_CROPS)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None for automatic), got {self.num_workers}")
