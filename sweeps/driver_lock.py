"""One driver per sweep folder: a lock file naming the driver (host and pid) that a second driver is refused on."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from sweeps.cluster import BadInput

LOCK_FILE = "driver.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLock:
    """`with DriverLock(folder):` holds the folder for this process; a live holder elsewhere -> BadInput. A lock
    left by a driver that died (same host, pid gone) is taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> "DriverLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return self
        raise BadInput(f"could not take the driver lock {self.path}: remove it if no driver runs this sweep")

    def _refuse_or_clear(self) -> None:
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            other = {}
        same_host = other.get("host") == self.me["host"]
        if same_host and isinstance(other.get("pid"), int) and not _alive(other["pid"]):
            self.path.unlink(missing_ok=True)  # its driver died: the sweep can be resumed here
            return
        raise BadInput(f"another driver runs sweep folder {self.path.parent} (pid {other.get('pid', '?')} on "
                       f"{other.get('host', '?')}): wait for it, or pick another --name")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
