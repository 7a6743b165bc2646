"""Per-epoch metrics of a run: ``metrics.jsonl``, ``metrics.csv`` and, when installed, TensorBoard.

Imports only :func:`widesparse.train.checkpoint.atomic_write`. TensorBoard is imported lazily and only when asked
for (``tensorboard=True``) or available (``None``), so it is never a dependency.

On resume the files are rewritten from the checkpoint's history before new rows are appended, so they agree
with the checkpoint even if the process died between writing the checkpoint and appending a row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from widesparse.train.checkpoint import atomic_write

__all__ = ["MetricsLog"]


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _tensorboard_writer(run_dir: Path, wanted: bool | None) -> Any:
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if wanted:
            raise ImportError(f"tensorboard=True needs the tensorboard package (pip install tensorboard): {e}") from e
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsLog:
    """Appends one row per epoch to ``metrics.jsonl`` and ``metrics.csv`` (columns fixed) and TensorBoard.

    Args:
        run_dir: The run folder.
        columns: CSV columns, in order; every row must have exactly these keys.
        history: Rows already recorded (a resumed run): the files are rewritten to hold exactly these.
        tensorboard: ``True``: require TensorBoard; ``None``: use it when installed; ``False``: never.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        columns: Sequence[str],
        history: Sequence[dict[str, Any]] = (),
        tensorboard: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.columns = list(columns)
        self.tb = _tensorboard_writer(self.run_dir, tensorboard)  # first: it may fail, before files are opened
        for row in history:
            self._check(row)
        jsonl = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write(self.run_dir / "metrics.jsonl", lambda f: f.write(jsonl))
        atomic_write(self.run_dir / "metrics.csv", lambda f: f.write(_csv_text(self.columns, history)))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self._csv = open(self.run_dir / "metrics.csv", "a", newline="")  # noqa: SIM115
        self._csv_writer = csv.DictWriter(self._csv, fieldnames=self.columns, lineterminator="\n")

    def _check(self, row: dict[str, Any]) -> None:
        if list(row) != self.columns:
            raise ValueError(f"metrics row keys {list(row)} differ from the columns {self.columns}")

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` everywhere and flush, so a crash loses nothing already written."""
        self._check(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._csv_writer.writerow(row)
        self._csv.flush()
        if self.tb is not None:
            step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
