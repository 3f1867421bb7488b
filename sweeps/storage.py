"""Where sweep folders live: a local folder, a shared mount, or a URI that every node of a Ray cluster reaches
(`s3://bucket/sweeps`, `gs://...`), all through one pyarrow filesystem.

A local folder or mount is used in place. With a URI, the storage holds the sweep and each node works in a
node-local copy of its folder (under SPEEDRUN_SWEEPS_CACHE, default /tmp/speedrun-sweeps-cache, the same path on
every node), as Ray Tune stages its own experiment state: Ray Tune and Ray Train write their state to the URI
themselves; the sweep's own files (SWEEP_FILES: settings, results, the Optuna journal, scheduler state, done
markers, logs, a script's trial folders) are pushed by whoever wrote them (a worker at its trial's end, the
driver after every finished trial and at the end) and pulled by the driver before it reads them (`--resume`,
a trial's log for MLflow). Inductor's and Triton's caches stay node-local; the portable compile artifacts are
stored under the URI (sweeps.compile_cache).

S3-compatible servers are reached through the usual AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
which pyarrow reads; FORWARDED_ENV names those handed on to the trials' workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "SPEEDRUN_SWEEPS_CACHE"
DEFAULT_CACHE = "/tmp/speedrun-sweeps-cache"
# what the sweep writes itself, by top-level name in its folder (Ray's own state is synced by Ray)
SWEEP_FILES = ("sweep.json", "results.parquet", "wall_time.json", "optuna.journal", "scheduler_state.pkl", "done",
               "logs", "trial_code", "statistics.md", "verdict.json", "runs")
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", CACHE_ENV)


def is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Storage:
    """The folder (or URI) holding sweep folders, as --storage gives it (a local folder made absolute)."""
    root: str

    @staticmethod
    def parse(text: str) -> "Storage":
        if is_uri(text):
            return Storage(text.rstrip("/"))
        return Storage(str(Path(text.removeprefix("file://")).expanduser().resolve()))

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    def __str__(self) -> str:
        return self.root

    def filesystem(self):
        """(pyarrow filesystem, the root's path inside it)."""
        from pyarrow import fs

        if not self.remote:
            return fs.LocalFileSystem(), self.root
        filesystem, path = fs.FileSystem.from_uri(self.root)
        return filesystem, path.rstrip("/")

    def local_root(self) -> Path:
        """Where this node works on the sweep folders: the root itself, or its node-local copy for a URI."""
        if not self.remote:
            return Path(self.root)
        scheme, rest = self.root.split("://", 1)
        return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)) / scheme / rest

    def local(self, name: str) -> Path:
        return self.local_root() / name

    def uri(self, name: str, *parts: str) -> str:
        """A path in the storage as Ray and pyarrow take it (a URI, or a local path)."""
        return "/".join([self.root, name, *parts])

    def check(self) -> None:
        """OSError unless sweep folders can be made here (a missing bucket, no credentials, a read-only folder)."""
        filesystem, base = self.filesystem()
        filesystem.create_dir(base, recursive=True)
        probe = f"{base}/.speedrun-sweeps-probe"
        with filesystem.open_output_stream(probe) as f:
            f.write(b"ok")
        filesystem.delete_file(probe)

    def exists(self, name: str, rel: str) -> bool:
        from pyarrow import fs

        if not self.remote:
            return (self.local(name) / rel).exists()
        filesystem, base = self.filesystem()
        return filesystem.get_file_info(f"{base}/{name}/{rel}").type != fs.FileType.NotFound

    def sweeps(self) -> list[str]:
        """Names of the sweeps stored here (folders holding a sweep.json)."""
        from pyarrow import fs

        filesystem, base = self.filesystem()
        try:
            entries = filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True))
        except OSError:
            return []
        return sorted(e.base_name for e in entries if e.type == fs.FileType.Directory
                      and filesystem.get_file_info(f"{e.path}/sweep.json").type == fs.FileType.File)

    def push(self, paths: list[Path]) -> None:
        """Copy these files (under local_root, or folders of them) to the storage; nothing for a local root."""
        if not self.remote:
            return
        filesystem, base = self.filesystem()
        root = self.local_root()
        for path in paths:
            for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                rel = file.relative_to(root).as_posix()
                filesystem.create_dir(f"{base}/{rel}".rsplit("/", 1)[0], recursive=True)
                with open(file, "rb") as src, filesystem.open_output_stream(f"{base}/{rel}") as dst:
                    dst.write(src.read())

    def push_sweep(self, name: str) -> None:
        """The sweep's own files (SWEEP_FILES) from this node's copy to the storage."""
        folder = self.local(name)
        self.push([folder / f for f in SWEEP_FILES if (folder / f).exists()])

    def pull(self, name: str, *rels: str) -> None:
        """Copy the sweep's own files (or only `rels` under its folder) from the storage to this node's copy;
        files this node already has at the same size are kept."""
        from pyarrow import fs

        if not self.remote:
            return
        filesystem, base = self.filesystem()
        local = self.local(name)
        for rel in rels or SWEEP_FILES:
            where = f"{base}/{name}/{rel}"
            info = filesystem.get_file_info(where)
            if info.type == fs.FileType.NotFound:
                continue
            infos = [info] if info.type == fs.FileType.File else filesystem.get_file_info(
                fs.FileSelector(where, recursive=True))
            for f in infos:
                if f.type != fs.FileType.File:
                    continue
                target = local / f.path[len(f"{base}/{name}/"):]
                if target.exists() and target.stat().st_size == f.size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with filesystem.open_input_stream(f.path) as src:
                    target.write_bytes(src.read())


def forwarded_env(storage: Storage) -> dict[str, str]:
    """The variables a remote storage needs in every worker (credentials, endpoint, the node-local cache)."""
    if not storage.remote:
        return {}
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def push_paths(root: str, *paths: str) -> None:
    """From a worker: its trial's files (absolute paths in this node's copy) to the storage `root` ("" or a local
    root: nothing to do)."""
    if root and is_uri(root):
        Storage(root).push([Path(p) for p in paths if p and Path(p).exists()])


def fetch_path(root: str, path: str, refresh: bool = False) -> bool:
    """Whether `path` (a file or folder in this node's copy of a sweep under `root`) exists, pulled from the
    storage first if it is missing here (or, with refresh, whatever of it changed)."""
    if root and is_uri(root) and (refresh or not os.path.exists(path)):
        storage = Storage(root)
        name, _, rel = Path(path).relative_to(storage.local_root()).as_posix().partition("/")
        storage.pull(name, rel)
    return os.path.exists(path)
