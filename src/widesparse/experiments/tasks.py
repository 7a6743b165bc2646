"""Execute one :class:`~widesparse.experiments.specs.Run` in its folder and write a verified ``result.json``.

Uses the engine (:func:`widesparse.train.engine.train`), CKA, spectra and profiling. A run folder is
``OUT/runs/<run id>``; it is written only under its claim (:mod:`widesparse.experiments.claims`). ``result.json``
appears only when the run finished, and records the size and SHA-256 of every file the run wrote (its
artefacts) plus a ``checksum`` of its own canonical JSON, so "done" means: ``result.json`` parses, its checksum
matches, and every artefact is there unchanged (:func:`verify`). A run that fails verification is not done: the
next :func:`execute` moves the folder to ``OUT/quarantine/`` and runs it again. A ``result.json`` without a
checksum (written before results were verified) is accepted as it is, unverified: rerunning every old sweep
would cost more than it protects. A training run interrupted mid-way resumes from its ``checkpoint.pt``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import platform
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["RESULT", "ERROR", "InvalidRun", "artefacts", "execute", "is_done", "read_result", "verify"]

RESULT = "result.json"
ERROR = "error.json"


_NOT_ARTEFACTS = {RESULT, ERROR, "checkpoint.pt"}


class InvalidRun(ValueError):
    """A run folder whose ``result.json`` fails verification (the message names the file and what is wrong)."""


_HASHED: dict[tuple[str, int, int, int, int], str] = {}


def _sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, inode, size, mtime, ctime) so a sweep that checks every run several
    times reads each large ``model.pt`` once; any write to the file changes its ctime and it is hashed again."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def artefacts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of every file a run wrote (not its result, error, checkpoint or temp files)."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        name = path.relative_to(run_dir).as_posix()
        if path.is_file() and name not in _NOT_ARTEFACTS and not path.name.startswith("."):
            out[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return out


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(run_dir: Path) -> dict[str, Any] | None:
    """The verified record of a finished run; ``None`` when ``result.json`` is absent (not done).

    Raises :class:`InvalidRun` naming the file when ``result.json`` is unreadable, its checksum does not match, or
    an artefact it lists is missing or changed (size or SHA-256).
    """
    path = run_dir / RESULT
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRun(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise InvalidRun(f"{path} is not valid JSON (truncated or garbage: {e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        raise InvalidRun(f"{path} is not a run result (no 'result' object)")
    if "checksum" not in record:
        return record  # written before results were verified: accepted, unverified
    if record["checksum"] != _checksum(record):
        raise InvalidRun(f"{path}: checksum mismatch (the file was changed or damaged after it was written)")
    for name, want in record.get("artefacts", {}).items():
        f = run_dir / name
        if not f.is_file():
            raise InvalidRun(f"{f} is missing (listed in {path})")
        if f.stat().st_size != want["size"]:
            raise InvalidRun(f"{f} changed: {f.stat().st_size} bytes, {path} recorded {want['size']}")
        if _sha256(f) != want["sha256"]:
            raise InvalidRun(f"{f} changed: its SHA-256 differs from the one {path} recorded")
    return record


def is_done(run_dir: Path) -> bool:
    """Finished and verified (:func:`verify`); a run that fails verification is not done. Changes nothing."""
    try:
        return verify(run_dir) is not None
    except InvalidRun:
        return False


def read_result(run_dir: Path) -> dict[str, Any]:
    """The verified record of a finished run; FileNotFoundError when not finished, :class:`InvalidRun` when bad."""
    record = verify(run_dir)
    if record is None:
        raise FileNotFoundError(f"{run_dir / RESULT} not found: the run has not finished")
    return record


def _tuples(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _train(params: dict[str, Any], run_dir: Path, threads: int | None) -> dict[str, Any]:
    from widesparse.train.config import TrainConfig
    from widesparse.train.engine import CHECKPOINT, train

    cfg = dict(params["config"])
    cfg["model_kwargs"] = _tuples(cfg["model_kwargs"])
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and (run_dir / "model.pt").is_file():  # trained; only result.json was missing
        summary = json.loads(summary_path.read_text())
    else:
        resume = str(run_dir) if (run_dir / CHECKPOINT).is_file() else None
        if resume is None and run_dir.exists():
            shutil.rmtree(run_dir)  # died before its first checkpoint: start over
        config = TrainConfig(**cfg, out_dir=str(run_dir.parent), run_name=run_dir.name, progress=False,
                             num_threads=threads, resume=resume)
        with io.StringIO() as buf, contextlib.redirect_stdout(buf):  # the engine's summary line: keep sweeps quiet
            summary = train(config)
    keys = ("test_acc", "test_err", "test_loss", "train_acc", "train_loss", "best_test_acc", "params", "epochs",
            "seconds", "train_seconds", "images_per_s")
    return {k: summary.get(k) for k in keys}


@functools.lru_cache(maxsize=2)
def _test_inputs(dataset: str, data_dir: str | None, seed: int) -> Any:
    """The test images every CKA run of a sweep compares on: read once per process, not once per pair."""
    from widesparse.data.datasets import load_dataset

    return load_dataset(dataset, data_dir=data_dir, seed=seed)[1].x


def _cka(params: dict[str, Any], run_dir: Path, threads: int | None) -> dict[str, Any]:
    import torch

    from widesparse.cka import run_comparison
    from widesparse.train.engine import load_run

    runs = run_dir.parent
    model_a, _ = load_run(runs / params["a"])
    model_b, _ = load_run(runs / params["b"])
    x = _test_inputs(params["dataset"], params.get("data_dir"), params["seed"])
    if threads:
        torch.set_num_threads(threads)
    s = run_comparison(model_a, model_b, x, run_dir, batch_size=params["batch_size"], passes=params["passes"],
                       seed=params["seed"], progress=False)
    acc = {k: json.loads((runs / params[k] / "summary.json").read_text())["test_acc"] for k in ("a", "b")}
    return {"diag_mean": s["diag_mean"], "num_examples": s["num_examples"], "test_acc_a": acc["a"],
            "test_acc_b": acc["b"], "layers_a": s["names_a"], "layers_b": s["names_b"]}


def _spectra(params: dict[str, Any], run_dir: Path, threads: int | None) -> dict[str, Any]:
    import torch

    from widesparse.analysis.spectra import spectra_table
    from widesparse.models import create_model

    if threads:
        torch.set_num_threads(threads)
    if "run" in params:  # a trained run: its weights, with the same model at init as the reference
        from widesparse.train.engine import init_model, load_run

        model, _ = load_run(run_dir.parent / params["run"])
        rows = spectra_table(model, reference=init_model(run_dir.parent / params["run"]))
    else:
        torch.manual_seed(params["seed"])
        model = create_model(params["model"], seed=params["seed"], **_tuples(params["model_kwargs"]))
        rows = spectra_table(model)
    expanding = [r for r in rows if r.out_features > r.in_features] or rows
    inits = [r.sigma_init for r in expanding if r.sigma_init is not None]
    return {
        "sigma_init": sum(inits) / len(inits) if inits else None,
        "sigma_max": sum(r.sigma_max for r in expanding) / len(expanding),
        "sigma_max_all": max(r.sigma_max for r in rows),
        "mp_edge": expanding[0].mp_edge,
        "layers": [r.to_dict() for r in rows],
    }


def _memory(params: dict[str, Any], run_dir: Path, threads: int | None) -> dict[str, Any]:
    from widesparse.analysis import profiling

    kw = {k: params[k] for k in ("batch_size", "image_size", "in_chans", "num_classes", "steps", "device")}
    return profiling.measure_step(params["model"], _tuples(params["model_kwargs"]), **kw)


_TASKS = {"train": _train, "cka": _cka, "spectra": _spectra, "memory": _memory}


def execute(run: dict[str, Any], out_dir: str, threads: int | None = None,
            keep_checkpoints: bool = False) -> dict[str, Any]:
    """Run ``run`` (``{"id", "kind", "params"}``) under ``out_dir/runs``; returns ``{"id", "ok", "seconds", ...}``.

    A finished training run keeps ``model.pt`` (what CKA and spectra read) and drops its resume checkpoint
    (optimizer state: 2-3x the weights) unless ``keep_checkpoints``.

    Never raises for a failing run: the error and traceback go to ``error.json`` in the run folder and the
    returned dict has ``ok=False`` (a sweep goes on; the report lists the failed runs).
    """
    from widesparse.experiments.claims import claim_run, claim_status
    from widesparse.train.quarantine import quarantine

    run_dir = Path(out_dir) / "runs" / run["id"]
    if is_done(run_dir):
        return {"id": run["id"], "ok": True, "cached": True, "seconds": 0.0}
    claim = claim_run(run_dir)
    if claim is None:  # a live holder runs it: the sweep comes back for it
        holder = claim_status(run_dir).holder
        return {"id": run["id"], "ok": False, "busy": True, "holder": holder, "seconds": 0.0,
                "error": f"held by {holder.get('host')} pid {holder.get('pid')}"}
    with claim:
        return _execute_claimed(run, run_dir, Path(out_dir), threads, keep_checkpoints, quarantine)


def _execute_claimed(run: dict[str, Any], run_dir: Path, out: Path, threads: int | None, keep_checkpoints: bool,
                     quarantine: Any) -> dict[str, Any]:
    """:func:`execute` once the run is ours: verify (quarantine a bad folder), run, record."""
    from widesparse.train.checkpoint import write_json

    try:
        if verify(run_dir) is not None:  # finished by the previous holder meanwhile
            return {"id": run["id"], "ok": True, "cached": True, "seconds": 0.0}
    except InvalidRun as e:
        quarantine(run_dir, out, str(e))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = _TASKS[run["kind"]](run["params"], run_dir, threads)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  (recorded, not swallowed: error.json + the report)
        run_dir.mkdir(parents=True, exist_ok=True)
        err = {"id": run["id"], "kind": run["kind"], "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()}
        write_json(run_dir / ERROR, err)
        return {"id": run["id"], "ok": False, "error": err["error"], "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR).unlink(missing_ok=True)
    if run["kind"] == "train" and not keep_checkpoints:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    record = {"id": run["id"], "kind": run["kind"], "params": run["params"], "result": result,
              "wall_seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
              "artefacts": artefacts(run_dir)}
    record = json.loads(json.dumps(record, default=str))  # exactly what the file will hold, so the checksum holds
    record["checksum"] = _checksum(record)
    write_json(run_dir / RESULT, record)
    return {"id": run["id"], "ok": True, "cached": False, "seconds": seconds}
