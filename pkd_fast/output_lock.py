"""One run at a time per --output-dir: the lock file rank 0 holds, and how a process is told apart from a
later one that reuses its pid. Its own module because it is a file protocol of its own, apart from the
process group and the checkpoints it protects (issue #29)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch.distributed as dist

from pkd_fast.dist import Dist
from pkd_fast.errors import PkdError


class OutputLock:
    """One run at a time per --output-dir. Two runs in one directory race on its checkpoints (one pruned
    the step the other was writing: FileNotFoundError in `_write_atomic`), so rank 0 of a run holds a lock
    file naming its host and pid (and the pid's start time, so a reused pid does not pass for the holder)
    until the run ends. A lock whose process is gone from this host is stale and taken over; one from
    another host cannot be checked and is refused, saying how to remove it."""

    NAME = ".pkd_fast.lock"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def take(cls, directory: Path, world: Dist) -> OutputLock | None:
        """Rank 0 takes the lock (ranks of one run share it); every rank raises its refusal. Collective."""
        lock, refusal = None, [None]
        if world.is_main:
            try:
                lock = cls(directory / cls.NAME)
                lock._acquire(directory)
            except PkdError as err:
                lock, refusal = None, [str(err)]
        if world.world_size > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise PkdError(refusal[0])
        return lock

    def _acquire(self, directory: Path) -> None:
        me = _process_identity(os.getpid())
        while True:
            try:
                with open(self.path, "x") as f:
                    json.dump(me, f)
                return
            except FileExistsError:
                pass
            holder = self._holder()
            who = f"pid {holder.get('pid')} on host {holder.get('host')}"
            if holder.get("host") != me["host"]:
                raise PkdError(f"--output-dir {directory}: held by the run of {who} (lock file {self.path}); "
                               f"a run on another host cannot be checked from here: if it has ended, delete {self.path}")
            if _process_identity(holder.get("pid")) == holder:
                raise PkdError(f"--output-dir {directory}: a live run ({who}) is writing there; wait for it to end, "
                               "stop it, or give another --output-dir")
            stale = self.path.with_name(f"{self.NAME}.stale-{me['pid']}")
            try:
                os.replace(self.path, stale)  # atomic: of two runs taking over, one moves it and the other retries
            except FileNotFoundError:
                continue
            stale.unlink()
            logging.getLogger("pkd_fast").warning("--output-dir %s: took over the lock of %s, which is no longer running",
                                                  directory, who)

    def _holder(self) -> dict:
        """The lock's contents; a lock still being written (or damaged) reads as held by an unknown process."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = None
        return holder if isinstance(holder, dict) else {"host": "an unknown host", "pid": "unknown"}

    def release(self) -> None:
        if self._holder() == _process_identity(os.getpid()):
            self.path.unlink(missing_ok=True)


def _process_identity(pid) -> dict | None:
    """{host, pid, started} of a process alive on this host, None when there is none. `started` (clock
    ticks after boot, from /proc) tells a reused pid from the process that held it."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        started = None
    return {"host": socket.gethostname(), "pid": pid, "started": started}
