"""Compile caches shared by the trials of a sweep.

Two layers. Every worker of a sweep gets `TORCHINDUCTOR_CACHE_DIR` in the sweep's folder (run.trial_env), so
trials on one node share Inductor's FX-graph, AOTAutograd, Triton and autotuning caches. On top of that,
PyTorch's portable cache artifacts ("Mega-Cache": `torch.compiler.save_cache_artifacts`) are kept in the
sweep's storage, which may be a URI every node of a Ray cluster reaches: the first trial that compiles a
graph signature saves them after its warm-up, and every later trial with that signature loads them before
compiling, on whatever node it lands.

A signature is speedrun.config.graph_signature (the knobs baked into compiled graphs) plus the world size,
the torch version and the GPU model: trials that differ only in learning rates, weight decay, momentum or
softcap constants share one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from speedrun.config import TrainConfig, graph_signature

ARTIFACT_SUFFIX = ".megacache"


def signature_key(cfg: TrainConfig, world_size: int, device_name: str = "") -> str:
    """A short name for the graphs this run compiles on this kind of machine."""
    import torch

    blob = json.dumps({"graphs": graph_signature(cfg), "world": world_size, "torch": torch.__version__,
                       "device": device_name}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_env(inductor_dir: str) -> dict[str, str]:
    """The compile-cache folders of a process: Inductor's, and Triton's inside it. Triton's is named too:
    Inductor sets it only when it builds its first kernel in a process, and on the H100 the first warm trial
    after a cold one built ~30 Triton kernels again (the head's own and some Inductor reductions) that the
    second warm trial then found; one folder for every process is meant to keep them from the cold trial on
    (not yet measured on the GPU)."""
    return {"TORCHINDUCTOR_CACHE_DIR": inductor_dir, "TRITON_CACHE_DIR": os.path.join(inductor_dir, "triton")}


def _filesystem(root: str):
    """(pyarrow filesystem, path inside it) for a local folder or a URI such as s3://bucket/sweeps/x."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(root)


@dataclass(frozen=True)
class ArtifactStore:
    """Portable compile-cache artifacts of one sweep, one file per signature, under `root`."""
    root: str

    def _where(self, key: str):
        filesystem, base = _filesystem(self.root)
        return filesystem, f"{base.rstrip('/')}/{key}{ARTIFACT_SUFFIX}"

    def has(self, key: str) -> bool:
        from pyarrow import fs

        filesystem, path = self._where(key)
        return filesystem.get_file_info(path).type == fs.FileType.File

    def load(self, key: str) -> bool:
        """Hot-load the artifacts of this signature into this process's caches; False if there are none or
        torch could not read them (it logs a warning: a damaged file, another torch's format)."""
        import torch

        if not self.has(key):
            return False
        filesystem, path = self._where(key)
        with filesystem.open_input_stream(path) as f:
            blob = f.read()
        return torch.compiler.load_cache_artifacts(blob) is not None

    def save(self, key: str) -> int:
        """Save what this process compiled (and loaded) under this signature; the bytes written (0: nothing
        compiled, or another trial saved it first)."""
        import torch

        if self.has(key):
            return 0
        artifacts = torch.compiler.save_cache_artifacts()
        if not artifacts or not artifacts[0]:
            return 0
        filesystem, path = self._where(key)
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.{hashlib.sha256(artifacts[0]).hexdigest()[:8]}.tmp"
        with filesystem.open_output_stream(tmp) as f:
            f.write(artifacts[0])
        filesystem.move(tmp, path)  # readers never see half a file (atomic on local and shared-mount folders)
        return len(artifacts[0])


def compile_counters() -> dict[str, int]:
    """What this process has compiled so far: dynamo graphs, Inductor/AOTAutograd cache hits and misses, and
    graphs AOTAutograd would not cache (bypasses: traced and partitioned again by every process)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "fx_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
            "aot_cache_hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "aot_cache_misses": int(counters["aot_autograd"]["autograd_cache_miss"]),
            "aot_cache_bypasses": int(counters["aot_autograd"]["autograd_cache_bypass"])}
