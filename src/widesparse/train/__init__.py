"""The training engine: ``train(TrainConfig(...))`` and what a run needs around it.

``engine`` runs the loop; ``config`` is :class:`TrainConfig`; ``feed`` hands out batches; ``recipe`` holds the
optimiser groups, schedule and evaluation; ``checkpoint`` writes atomically and resumes exactly; ``metrics``
logs per epoch; ``distributed`` is data parallelism under ``torchrun``; ``run_folder`` makes and reads run
folders.
"""

from widesparse.train.engine import (
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    init_model,
    load_run,
    make_run_dir,
    param_groups,
    resolve_model_kwargs,
    train,
    warmup_cosine,
)

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
