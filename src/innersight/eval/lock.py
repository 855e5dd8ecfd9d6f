"""One writer per run folder: each process of a run holds the lock of its rank's file.

Two ``innersight eval`` processes on the same ``--output`` would otherwise both redo every
pending sample and append to the same ``samples.rank0.jsonl``. Each process therefore takes an
exclusive lock (``filelock``: ``flock`` on POSIX, ``msvcrt`` on Windows) on ``.rank{R}.lock`` in
the run folder for the whole run; the operating system drops it when the process ends, also
after a kill, so a crashed run never leaves a stale lock. Who holds it (pid, host, start time) is
written beside it in ``.rank{R}.owner.json``, so that a second process can say who is busy.

A second process on the same folder and the same rank is refused at once with that line; the
processes of one ``torchrun`` / ``accelerate launch`` run have different ranks, so they share the
folder as before (each writes its own rank file).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ..errors import UserInputError


class RunBusyError(UserInputError):
    """Another process is writing this rank of this run folder."""


class RunLock:
    """``with RunLock(run_dir, rank):`` -- hold ``run_dir``'s lock for ``rank`` (created if needed)
    or raise :class:`RunBusyError` naming the holder."""

    def __init__(self, run_dir: str | Path, rank: int = 0) -> None:
        from filelock import FileLock

        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.path = self.run_dir / f".rank{self.rank}.lock"
        self.owner_path = self.run_dir / f".rank{self.rank}.owner.json"
        self._lock = FileLock(str(self.path), timeout=0)

    def holder(self) -> str:
        """Who holds the lock, as read from the owner file (``unknown`` if it is not there yet)."""
        try:
            owner = json.loads(self.owner_path.read_text(encoding="utf-8"))
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["started"])))
            return f"pid {owner['pid']} on {owner['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its pid yet"

    def check_free(self) -> None:
        """Raise :class:`RunBusyError` now if another process holds this lock (e.g. before a slow
        model load); creates nothing when the run folder does not exist yet. The lock itself is
        taken by ``with``; a process that takes it in between is still refused there."""
        if self.run_dir.is_dir():
            with self:
                pass

    def __enter__(self) -> RunLock:
        from filelock import Timeout

        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            rank = f" (rank {self.rank})" if self.rank else ""
            raise RunBusyError(
                f"{str(self.run_dir)!r}{rank} is being written by another innersight eval ({self.holder()}); "
                f"wait for it to finish, or choose another --output (processes share one run folder only "
                f"when launched together by torchrun or accelerate launch)") from None
        tmp = self.owner_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "rank": self.rank,
                                   "started": time.time()}), encoding="utf-8")
        os.replace(tmp, self.owner_path)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.owner_path.unlink(missing_ok=True)  # still ours: we hold the lock
        finally:
            self._lock.release()
