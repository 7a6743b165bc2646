"""Optional timm integration: every widesparse model in timm's registry as ``widesparse_<name>``.

Imports the model registry and :mod:`widesparse.data.datasets` (normalisation statistics); timm itself only
when :func:`register_timm_models` runs. After it, ``timm.create_model('widesparse_mixer_b16', num_classes=1000)``
builds our Mixer-B/16, and timm's own ``train.py`` (in the timm GitHub repository, not in the wheel) trains
any widesparse model. Either run it through this module::

    python -m widesparse.timm_compat PATH/TO/timm/train.py --model widesparse_mixer_b16 [timm args ...]
    torchrun --nproc-per-node 8 -m widesparse.timm_compat PATH/TO/timm/train.py --model widesparse_mixer_b16 ...

or add one line at the top of ``train.py``::

    import widesparse.timm_compat; widesparse.timm_compat.register_timm_models()

The keyword arguments timm passes are mapped (:func:`timm_kwargs_to_widesparse`): ``img_size`` to
``image_size``, ``drop_path_rate`` as is (our models schedule it linearly over the blocks);
``pretrained=True`` raises (widesparse ships no weights); ``drop_rate``, ``drop_block_rate`` and a
``global_pool`` other than ``"avg"`` raise unless they are off (our models have no classifier dropout, no
DropBlock, and pool by the token mean); batch-norm settings (``bn_momentum``, ``bn_eps``, ``bn_tf``) are
dropped (no batch norm anywhere). Each model carries a ``pretrained_cfg`` (input size, mean/std, first conv
``stem.proj``, classifier ``head``) that ``timm.data.resolve_data_config`` reads.

One difference from our engine: timm's optimizer factory exempts every 1-D parameter from weight decay, so a
``sw_mlp`` with the ``sparse`` backend (weights stored as a vector of values) is not decayed there; use
``backend="masked"`` for parity with :func:`widesparse.train.recipe.param_groups`.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from widesparse.data.datasets import get_dataset_info
from widesparse.models import create_model, list_models, model_defaults

__all__ = ["PREFIX", "default_cfg", "main", "register_timm_models", "timm_kwargs_to_widesparse"]

PREFIX = "widesparse_"
_DROPPED = ("bn_momentum", "bn_eps", "bn_tf", "scriptable", "exportable", "no_jit", "cache_dir")
default_cfgs: dict[str, dict[str, Any]] = {}  # timm's register_model reads the module's ``default_cfgs``


def _stats(name: str, in_chans: int, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics: CIFAR-10's for the CIFAR presets and 32-px 3-channel models, else ImageNet's."""
    info = get_dataset_info("cifar10" if "cifar" in name or (image_size == 32 and in_chans == 3) else "imagefolder")
    mean, std = info.mean, info.std
    if in_chans != 3:
        mean, std = (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    return tuple(mean), tuple(std)


def _size(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def default_cfg(name: str, model: nn.Module | None = None, **overlay: Any) -> dict[str, Any]:
    """timm ``pretrained_cfg`` of widesparse model ``name`` (from ``model`` when given, else its defaults)."""
    if model is None:
        preset = model_defaults(name)
        if {"image_size", "in_chans", "num_classes"} <= set(preset):
            image, in_chans, classes = _size(preset["image_size"]), preset["in_chans"], preset["num_classes"]
            conv = True  # the sized presets are all Mixers (patch embedding ``stem.proj``)
        else:  # a model sized by its own defaults (all small): build it without memory to read them
            return default_cfg(name, create_model(name, device="meta"), **overlay)
    else:
        proj = getattr(getattr(model, "stem", None), "proj", None)
        conv = isinstance(proj, nn.Conv2d)
        in_chans = proj.in_channels if conv else int(getattr(model, "in_chans", 3))
        image = _size(getattr(model.stem, "image_size", None) if conv else getattr(model, "image_size", 224))
        classes = int(getattr(model, "num_classes", 0))
    mean, std = _stats(name, in_chans, image[0])
    cfg = {
        "url": "", "hf_hub_id": None, "architecture": PREFIX + name, "num_classes": classes,
        "input_size": (in_chans, *image), "pool_size": None, "crop_pct": 0.875, "crop_mode": "center",
        "interpolation": "bilinear", "mean": mean, "std": std, "first_conv": "stem.proj" if conv else None,
        "classifier": "head", "license": "apache-2.0", "notes": ("widesparse model: no pretrained weights",),
    }  # fmt: skip
    cfg.update(overlay)
    return cfg


def timm_kwargs_to_widesparse(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments timm's ``create_model`` (and its ``train.py``) pass, as widesparse model kwargs.

    Raises ``ValueError`` for settings our models cannot honour (naming them and what would work).
    """
    out = {k: v for k, v in kwargs.items() if v is not None and k not in _DROPPED}
    if out.pop("pretrained", False):
        raise ValueError(
            f"widesparse_{name}: pretrained=True, but widesparse ships no pretrained weights; train it, or load a "
            "state_dict with checkpoint_path=..."
        )
    for key in ("drop_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate"):
        if out.pop(key, 0.0):
            raise ValueError(f"widesparse_{name}: {key}={kwargs[key]} is not supported (these models have no such "
                             "dropout); use drop_path_rate for stochastic depth, or leave it 0")
    pool = out.pop("global_pool", "avg")
    if pool not in ("avg", "token_mean"):
        raise ValueError(f"widesparse_{name}: global_pool={pool!r} is not supported; the head pools by the token "
                         "mean ('avg')")
    if out.pop("features_only", False):
        raise ValueError(f"widesparse_{name}: features_only is not supported; use model.forward_intermediates(x)")
    if "img_size" in out:
        out["image_size"] = out.pop("img_size")
    if not out.get("drop_path_rate", 1.0):
        out.pop("drop_path_rate")  # 0 is every model's default; models without stochastic depth accept it so
    return out


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def fn(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        model = create_model(name, **timm_kwargs_to_widesparse(name, {"pretrained": pretrained, **kwargs}))
        cfg = default_cfg(name, model)
        if isinstance(pretrained_cfg, dict):  # the caller's own; timm's registry default (a PretrainedCfg) describes
            cfg.update(pretrained_cfg)  # the default sizes, while ``cfg`` describes the model as built
        cfg.update(pretrained_cfg_overlay or {})
        model.pretrained_cfg = model.default_cfg = cfg
        return model

    fn.__name__ = fn.__qualname__ = PREFIX + name
    fn.__module__ = __name__
    fn.__doc__ = f"widesparse model {name!r} (see `widesparse describe {name}`)."
    return fn


def register_timm_models(names: Sequence[str] | None = None) -> list[str]:
    """Register widesparse models (default: all of them) in timm's registry; returns the timm names.

    Idempotent: names this module already registered are skipped. Raises ``ImportError`` without timm.
    """
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise ImportError(f"the timm integration needs an importable timm (pip install timm): {type(e).__name__}: "
                          f"{e}") from e
    wanted = list_models() if names is None else list(names)
    unknown = sorted(set(wanted) - set(list_models()))
    if unknown:
        raise ValueError(f"unknown widesparse model(s) {unknown}; valid: {', '.join(list_models())}")
    out = []
    for name in wanted:
        timm_name = PREFIX + name
        if not is_model(timm_name) or getattr(model_entrypoint(timm_name), "__module__", None) != __name__:
            default_cfgs[timm_name] = default_cfg(name)
            register_model(_entrypoint(name))
        out.append(timm_name)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m widesparse.timm_compat SCRIPT [ARGS...]``: register, then run ``SCRIPT`` as ``__main__``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    register_timm_models()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":  # run as the module itself, so that timm records it as widesparse.integrations.timm
    import widesparse.integrations.timm as timm_compat

    sys.exit(timm_compat.main())
