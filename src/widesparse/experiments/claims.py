"""Claimed runs: who may write into a run folder, so that several sweeps (or SLURM jobs) can share one output folder.

The protocol, stated once:

- A run folder ``OUT/runs/<id>`` is written only by the holder of its claim, the file ``OUT/runs/<id>.claim``
  beside the folder. It lies beside the folder, not inside it, because the holder may delete and recreate the
  folder (a run that died before its first checkpoint starts over) and the engine creates the folder itself.
- Claiming is creating that file with ``os.open(O_CREAT | O_EXCL)``: atomic on POSIX (and on NFSv3+), so exactly
  one of several contenders wins. The file holds JSON: ``host``, ``pid``, ``started`` (UTC ISO time), ``token``
  (unique per claim) and ``job`` (``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``, or ``SLURM_JOB_ID``, or null).
- The holder keeps the claim alive by touching its mtime every :data:`HEARTBEAT` seconds (a daemon thread while
  the run executes). A claim is *stale* when its holder is provably gone: same host and the pid is not alive, or
  (any host) its mtime is older than :data:`STALE_AFTER` seconds. A stale claim may be taken over: it is renamed
  aside atomically (only one contender's rename succeeds), one line is logged, and the new claim is created.
- The claim is released (file removed, only if it still holds our token) when the run ends, done or failed.
- Someone who finds a run held by a live holder skips it and comes back later (:func:`claim_status`), waiting
  until the run is done or its claim turns stale. Nobody deletes or writes a run folder they do not hold.
- Sweep-wide files (``plan.json``, the tables, the report) are written under :func:`sweep_lock`, an
  ``fcntl.flock`` on ``OUT/.sweep.lock`` (released by the kernel when the process dies).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HEARTBEAT", "STALE_AFTER", "Claim", "ClaimStatus", "claim_path", "claim_run", "claim_status",
           "sweep_lock"]

HEARTBEAT = 30.0
STALE_AFTER = 600.0
log = logging.getLogger(__name__)


def claim_path(run_dir: str | os.PathLike[str]) -> Path:
    """``OUT/runs/<id>.claim`` for the run folder ``OUT/runs/<id>``."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".claim")


def _job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass
class ClaimStatus:
    """What :func:`claim_status` found: ``state`` is ``free``, ``held`` or ``stale``; ``holder`` the claim's JSON
    (``{}`` when free or unreadable); ``why`` a few words on a stale claim."""

    state: str
    holder: dict[str, Any] = field(default_factory=dict)
    why: str = ""


def claim_status(run_dir: str | os.PathLike[str], stale_after: float | None = None) -> ClaimStatus:
    """Whether the run folder is claimed, by whom, and whether that claim is stale (see the module docstring)."""
    path = claim_path(run_dir)
    limit = STALE_AFTER if stale_after is None else stale_after
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return ClaimStatus("free")
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError
    except ValueError:  # being written this instant, or garbage: only age decides
        holder = {}
        if age > max(limit, 5.0):
            return ClaimStatus("stale", holder, f"unreadable claim, untouched for {age:.0f} s")
        return ClaimStatus("held", holder)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"]):
        return ClaimStatus("stale", holder, f"process {holder['pid']} on {holder['host']} is gone")
    if age > limit:
        return ClaimStatus("stale", holder, f"no heartbeat for {age:.0f} s (limit {limit:.0f} s)")
    return ClaimStatus("held", holder)


class Claim:
    """A held claim on one run folder: :meth:`release` (or leave the ``with`` block) when the run ends.

    While held, a daemon thread touches the claim file every ``heartbeat`` seconds.
    """

    def __init__(self, run_dir: Path, info: dict[str, Any], heartbeat: float = HEARTBEAT) -> None:
        self.run_dir, self.path, self.info = run_dir, claim_path(run_dir), info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                        name=f"claim-heartbeat-{run_dir.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self.touch()

    def touch(self) -> None:
        """Refresh the heartbeat (the claim file's mtime)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file, if it is still ours (never someone's takeover)."""
        self._stop.set()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.info["token"]:
                self.path.unlink()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run(run_dir: str | os.PathLike[str], *, stale_after: float | None = None,
              heartbeat: float = HEARTBEAT) -> Claim | None:
    """Claim ``run_dir`` for this process; ``None`` when a live holder has it. A stale claim is taken over."""
    run_dir = Path(run_dir)
    path = claim_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(), "token": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            st = claim_status(run_dir, stale_after)
            if st.state != "stale":
                return None
            aside = path.with_name(f"{path.name}.stale-{info['token']}")
            try:
                os.rename(path, aside)  # exactly one contender moves this claim aside
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue
                raise
            with contextlib.suppress(OSError, ValueError):  # a racing contender's fresh claim: put it back
                if st.holder.get("token") and json.loads(aside.read_text()).get("token") != st.holder["token"]:
                    os.link(aside, path)
            aside.unlink(missing_ok=True)
            log.warning("widesparse: taking over the stale claim on %s (held by %s pid %s, job %s): %s", run_dir,
                        st.holder.get("host"), st.holder.get("pid"), st.holder.get("job"), st.why)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
            f.flush()
            os.fsync(f.fileno())
        return Claim(run_dir, info, heartbeat)
    return None


@contextlib.contextmanager
def sweep_lock(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``OUT/.sweep.lock`` exclusively (``fcntl.flock``, blocking) while writing sweep-wide files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no sweep lock
        yield
        return
    with open(out / ".sweep.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
