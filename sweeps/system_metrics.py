"""Worker side: CPU, memory and GPU use of a trial's rank-0 node, sampled in a thread and attached to the trial's
reports under MLflow's system-metric names (`system/cpu_utilization_percentage`, `system/gpu_0_...`), so that the
driver, the only MLflow writer, logs them and the UI shows them in the run's system metrics. psutil (a Ray
dependency) for the host, nvidia-ml-py (pynvml) for GPUs where it is installed.
"""

from __future__ import annotations

import threading
from collections import defaultdict

PREFIX = "system/"


class SystemSampler:
    def __init__(self, gpu_indices: list[int] | None = None, interval_s: float = 5.0):
        import psutil

        self._psutil = psutil
        self._nvml = None
        self._gpus: list[tuple[int, object]] = []
        if gpu_indices:
            try:
                import pynvml
                pynvml.nvmlInit()
                self._nvml = pynvml
                self._gpus = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in gpu_indices]
            except Exception:  # noqa: BLE001 - no NVML (no driver, no nvidia-ml-py): host metrics only
                self._nvml, self._gpus = None, []
        self._samples: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval_s
        psutil.cpu_percent()  # the first call only starts psutil's interval
        self._thread = threading.Thread(target=self._run, daemon=True, name="system-metrics")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        memory = self._psutil.virtual_memory()
        values = {"cpu_utilization_percentage": self._psutil.cpu_percent(),
                  "system_memory_usage_megabytes": memory.used / 1e6,
                  "system_memory_usage_percentage": memory.percent}
        for i, handle in self._gpus:
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                values[f"gpu_{i}_utilization_percentage"] = float(util.gpu)
                values[f"gpu_{i}_memory_usage_megabytes"] = mem.used / 1e6
                values[f"gpu_{i}_memory_usage_percentage"] = 100.0 * mem.used / mem.total
                values[f"gpu_{i}_power_usage_watts"] = self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000
            except Exception:  # noqa: BLE001 - a GPU query can fail transiently; keep the host metrics
                pass
        with self._lock:
            for k, v in values.items():
                self._samples[k].append(float(v))

    def take(self) -> dict[str, float]:
        """The mean of each metric since the last take, under MLflow's names; empty if nothing was sampled."""
        if not self._samples:
            self.sample()
        with self._lock:
            out = {PREFIX + k: round(sum(v) / len(v), 1) for k, v in self._samples.items() if v}
            self._samples.clear()
        return out

    def stop(self) -> None:
        self._stop.set()
