"""The ``widesparse`` command line: each command is a thin call into the library.

    widesparse models [PATTERN]
    widesparse describe NAME [--check] [--all] [--KWARG VALUE ...]
    widesparse plan --omega 2**19 --gamma 2 [--S 4,8,16] [--round]
    widesparse cka RUN_A [RUN_B | --self] --dataset digits [--batch-size 256 --passes 10]
    widesparse spectra NAME-or-RUN_DIR [--method auto] [--KWARG VALUE ...]
    widesparse train --model NAME --dataset digits [--epochs N ...] [--KWARG VALUE ...]
    widesparse reproduce [E1 E2 ...] --scale tiny|small|paper [--data-dir DIR] [--backend local|ray] [--plan]
    widesparse report OUT_DIR
    widesparse bench [--quick] [--only NAME] [--list]   (runs benchmarks/run_all.py of a source checkout)

Unknown ``--key value`` options of ``describe``, ``spectra`` and ``train`` are model keyword arguments (``--dim 64``,
``--patch-size 2,4``, ``--act-layer relu``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser", "parse_model_kwargs"]


def parse_value(text: str) -> Any:
    """``"3" -> 3``, ``"0.5" -> 0.5``, ``"true" -> True``, ``"2,4" -> (2, 4)``, ``"none" -> None``, else the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if "," in text:
        return tuple(parse_value(t) for t in text.split(",") if t)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_model_kwargs(extra: Sequence[str]) -> dict[str, Any]:
    """``["--dim", "64", "--patch-size", "2,4", "--no-norm"]`` -> ``{"dim": 64, "patch_size": (2, 4), ...}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"unexpected argument {tok!r}; model options look like --dim 64")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            out[key] = parse_value(val)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out[key] = parse_value(extra[i + 1])
            i += 2
        else:
            out[key] = True
            i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="widesparse", description="MLP-Mixer as a wide and sparse MLP.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("models", help="list registered models")
    s.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'rp_*'")

    s = sub.add_parser("describe", help="effective widths, densities and connections of a model")
    s.add_argument("name", help="registered model name (see `widesparse models`)")
    s.add_argument("--check", action="store_true", help="also verify to_wide_mlp against the model (float64)")
    s.add_argument("--all", action="store_true", help="show every layer, not only the first blocks")

    s = sub.add_parser("plan", help="Mixer shapes (S, C) along a fixed connection budget")
    s.add_argument("--omega", required=True, help="connections per layer, e.g. 2**19 or 524288")
    s.add_argument("--gamma", type=float, default=2.0, help="expansion factor (default 2)")
    s.add_argument("--S", dest="S", default=None, help="token counts, e.g. 4,8,16 (default: powers of two)")
    s.add_argument("--round", action="store_true", help="round C to integers and report the realised budget")

    s = sub.add_parser("cka", help="mini-batch CKA between the mixing layers of two models")
    s.add_argument("run_a", help="run folder of `widesparse train`, or a registered model name (untrained)")
    s.add_argument("run_b", nargs="?", default=None, help="second run folder or model name (omit with --self)")
    s.add_argument("--dataset", default="digits", help="test split to compare on (default digits)")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--passes", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--self", dest="self_", action="store_true", help="compare RUN_A with itself")
    s.add_argument("--float32-grams", action="store_true", help="float32 Gram matrices (faster; float64 sums)")
    s.add_argument("--out", default=None, help="output folder (default: cka-<A>-vs-<B>)")

    s = sub.add_parser("spectra", help="largest singular value of every mixing weight vs Marchenko-Pastur")
    s.add_argument("target", help="registered model name, or a run folder of `widesparse train`")
    s.add_argument("--method", default="auto", choices=["auto", "lanczos", "power", "dense"])

    s = sub.add_parser("train", help="train a model on a data set (digits is embedded)")
    _add_config_options(s)
    s.add_argument("--config", dest="config_file", default=None, help="YAML/TOML/JSON file of TrainConfig fields")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("reproduce", help="run the paper's experiments E1-E10 as a resumable sweep with a report")
    s.add_argument("experiments", nargs="*", metavar="EXP", help="experiment ids (default: all), e.g. E1 E7")
    s.add_argument("--scale", default="tiny", help="tiny (digits, CPU minutes), small, or paper (default tiny)")
    s.add_argument("--data-dir", default=None, help="folder of the on-disk data sets (small and paper scales)")
    s.add_argument("--dataset", default=None, help="override the scale's data set (e.g. fashion_mnist, cifar10)")
    s.add_argument("--out", default=None, help="output folder (default reproduce-<scale>); rerun to resume")
    s.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the scale's)")
    s.add_argument("--epochs", type=int, default=None, help="override the scale's epochs")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default cpu)")
    s.add_argument("--backend", default="local", choices=["local", "ray"])
    s.add_argument("--workers", type=int, default=None,
                   help="parallel runs (local: processes; default one per core up to 8 at --scale tiny, else 1; "
                        "ray: CPUs of a local instance)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / workers)")
    s.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default a local instance")
    s.add_argument("--plan", action="store_true", help="list the runs with sizes and estimates; run nothing")
    s.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished training run's resume checkpoint (default: keep only model.pt)")

    s = sub.add_parser("report", help="rebuild tables, figures and report.md/html of a reproduce folder")
    s.add_argument("out_dir", help="output folder of `widesparse reproduce`")

    sub.add_parser("bench", help="run every benchmark that applies to this machine (benchmarks/run_all.py); "
                                 "options are passed on, see `widesparse bench --help`", add_help=False)
    return p


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _caster(type_name: str) -> Any:
    """argparse ``type`` for a dataclass field annotation such as ``"int | None"``."""
    parts = {part.strip() for part in str(type_name).split("|")}
    for name, cast in (("bool", _parse_bool), ("int", int), ("float", float)):
        if name in parts:
            return cast
    return str


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--key value`` option per field of :class:`widesparse.train.engine.TrainConfig`.

    The defaults stay the config's."""
    import dataclasses

    from widesparse.train.engine import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_kwargs":
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, type=_caster(f.type),
                            metavar=f.name.upper(), help=f"TrainConfig.{f.name} (default: {default})")


def _cmd_models(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from widesparse.models import list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_describe(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    import torch

    from widesparse.effective import ModelTooLargeError, check_materialisable, describe, format_report, to_wide_mlp
    from widesparse.models import create_model

    model = create_model(args.name, device="meta", **extra)
    print(format_report(describe(model, args.name), max_rows=None if args.all else 8))
    if not args.check:
        return 0
    try:
        check_materialisable(model, torch.float64)  # on the meta model: say so before allocating the real one
        model = create_model(args.name, dtype=torch.float64, **extra).eval()
        wide = to_wide_mlp(model)
    except ModelTooLargeError as e:
        print(f"check: not possible: {e}", file=sys.stderr)
        return 2
    stem = model.stem
    x = torch.randn(2, stem.proj.in_channels, *stem.image_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (wide(x) - model(x)).abs().max().item()
    ok = err < 1e-10
    print(f"check: to_wide_mlp(model) vs model on random input (float64): max abs error {err:.3e} "
          f"({'OK' if ok else 'FAILED'}, tolerance 1e-10)")
    return 0 if ok else 1


def _cmd_plan(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from widesparse.budget import default_S_values, format_plan, parse_budget, shapes_for_budget

    if extra:
        raise ValueError(f"plan takes no extra options, got {sorted(extra)}")
    omega = parse_budget(args.omega)
    S_values = [int(v) for v in str(args.S).split(",")] if args.S else default_S_values(omega, args.gamma)
    shapes = shapes_for_budget(omega, args.gamma, S_values, round_channels=args.round)
    print(format_plan(shapes, omega=omega, gamma=args.gamma))
    return 0


def _cmd_train(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    import dataclasses

    from widesparse.train.engine import TrainConfig, train

    values: dict[str, Any] = {}
    if args.config_file:
        values.update(TrainConfig.from_file(args.config_file).to_dict())
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    values["model_kwargs"] = {**values.get("model_kwargs", {}), **extra}
    if args.no_progress:
        values["progress"] = False
    train(TrainConfig.from_dict(values))
    return 0


def _is_run_folder(target: str) -> bool:
    """Whether ``target`` names a run folder; a path-like name that is no folder is ``no such run folder``."""
    import os
    from pathlib import Path

    path = Path(os.path.expanduser(target))
    if path.is_dir():
        return True
    if os.sep in target or "/" in target or target.startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"no such run folder: {target}")
    return False


def _model_for(target: str, dataset: str, extra: dict[str, Any], seed: int):
    """A trained model from a run folder, or an untrained registry model sized for ``dataset``."""
    import os

    from widesparse.data.datasets import get_dataset_info
    from widesparse.train.engine import TrainConfig, load_run, resolve_model_kwargs

    if _is_run_folder(target):
        return load_run(os.path.expanduser(target))[0]
    from widesparse.models import create_model

    info = get_dataset_info(dataset)
    cfg = TrainConfig(model=target, dataset=dataset, seed=seed, model_kwargs=dict(extra))
    return create_model(target, **resolve_model_kwargs(cfg, info)).eval()


def _cmd_cka(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from pathlib import Path

    import torch

    from widesparse import cka
    from widesparse.analysis import plots
    from widesparse.data.datasets import load_dataset

    if args.run_b is None and not args.self_:
        raise ValueError("give two models (RUN_A RUN_B) or --self to compare RUN_A with itself")
    if args.run_b is not None and args.self_:
        raise ValueError("--self compares RUN_A with itself: give only RUN_A")
    _, test, _ = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
    model_a = _model_for(args.run_a, args.dataset, extra, args.seed)
    model_b = None if args.self_ else _model_for(args.run_b, args.dataset, extra, args.seed)
    label_a = Path(args.run_a).name
    label_b = label_a if args.self_ else Path(args.run_b).name
    out = Path(args.out or f"cka-{label_a}-vs-{label_b}")
    summary = cka.run_comparison(
        model_a, model_b, test.x, out, label_a=label_a, label_b=label_b, batch_size=args.batch_size,
        passes=args.passes, seed=args.seed, gram_dtype=torch.float32 if args.float32_grams else torch.float64,
        progress=sys.stderr.isatty(), plot_fn=plots.plot_cka,
    )
    print(f"CKA {label_a} vs {label_b} on {args.dataset}: mean of the diagonal {summary['diag_mean']:.4f}; "
          f"wrote {out}/cka.npy, cka.csv, cka.png")
    return 0


def _cmd_spectra(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    import os

    from widesparse.analysis.spectra import format_spectra, spectra_table
    from widesparse.models import create_model

    if _is_run_folder(args.target):
        from widesparse.train.engine import init_model, load_run

        target = os.path.expanduser(args.target)
        trained, _ = load_run(target)
        rows = spectra_table(trained, reference=init_model(target), method=args.method)
    else:
        rows = spectra_table(create_model(args.target, **extra), method=args.method)
    print(format_spectra(rows, title=args.target))
    return 0


def _cmd_reproduce(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    import os

    from widesparse.experiments.reproduce import reproduce
    from widesparse.train.device import check_device

    if not args.plan and args.device is not None:  # before any run starts (a plan is fine anywhere)
        check_device(args.device)
    # tiny runs are overhead-bound: one single-threaded run per core; larger runs use all cores each
    cores = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else (min(cores, 8) if args.scale == "tiny" else 1)
    res = reproduce(
        args.experiments or None, scale=args.scale, out=args.out, dataset=args.dataset, data_dir=args.data_dir,
        seeds=args.seeds, epochs=args.epochs, device=args.device, backend=args.backend, workers=workers,
        threads=args.threads, address=args.address, plan_only=args.plan, keep_checkpoints=args.keep_checkpoints,
        command="widesparse " + " ".join(sys.argv[1:] if sys.argv and "widesparse" in sys.argv[0] else ["reproduce"]),
    )
    if args.plan:
        print(res["plan"])
        return 0
    print(res["report"]["summary_md"])
    print(f"report: {res['out']}/report.md and report.html; table: {res['out']}/results.csv")
    return 1 if res["sweep"].failed else 0


def _cmd_report(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from widesparse.experiments.report import build_report

    rep = build_report(args.out_dir)
    print(rep["summary_md"])
    print(f"rebuilt {args.out_dir}/report.md, report.html, results.csv, aggregated.csv and figures/")
    return 0


def _benchmarks_dir() -> Any:
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "run_all.py").is_file():
            return root / "benchmarks"
    raise FileNotFoundError("benchmarks/run_all.py not found in the current folder or in the package's source "
                            "checkout: run `widesparse bench` from a clone of the widesparse repository")


def _cmd_bench(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    import importlib.util

    path = _benchmarks_dir() / "run_all.py"
    spec = importlib.util.spec_from_file_location("widesparse_bench_run_all", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return int(module.main(args.bench_args) or 0)


_COMMANDS = {
    "models": _cmd_models,
    "describe": _cmd_describe,
    "cka": _cmd_cka,
    "plan": _cmd_plan,
    "spectra": _cmd_spectra,
    "train": _cmd_train,
    "reproduce": _cmd_reproduce,
    "report": _cmd_report,
    "bench": _cmd_bench,
}


def _show_package_log() -> None:
    """The package's INFO lines (e.g. the one-time build of :mod:`widesparse.ops.cpu_kernels`) on stderr, unless the
    caller configured logging already."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s", level=logging.WARNING)
    if logging.getLogger("widesparse").level == logging.NOTSET:
        logging.getLogger("widesparse").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``widesparse`` console script; returns the exit code."""
    _show_package_log()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to benchmarks/run_all.py
        args = argparse.Namespace(command="bench", bench_args=argv[1:])
        rest: list[str] = []
    else:
        args, rest = parser.parse_known_args(argv)
    try:
        if rest and args.command not in ("describe", "train", "spectra", "cka"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        extra = parse_model_kwargs(rest)
        return _COMMANDS[args.command](args, extra)
    except (ValueError, TypeError, FileNotFoundError, ImportError, MemoryError) as e:
        print(f"widesparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from widesparse.train.engine import NonFiniteLossError

        if not isinstance(e, NonFiniteLossError):
            raise
        print(f"widesparse {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
