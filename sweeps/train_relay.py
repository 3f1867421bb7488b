"""One Ray Train run inside a Tune trial: its reports relayed to Tune, and its end taken from the trial's done
file when Ray loses the last report.

Ray's own `TuneReportCallback` hands reports to Tune's session thread through a one-slot queue actor. In about
one trial in a few hundred on a loaded 2-core machine, the trial's last report never reached Tune and `fit()`
never returned, though the worker had trained to the end and written the trial's done file: the trial hung until
the stall watchdog failed it. Here the trial's own thread relays every report (`ray.tune.report`) while `fit()`
runs in a helper thread, so it knows what Tune has heard; when the final report has not come `grace_s` after the
done file appeared, it reports the done file's end itself, and when the final report came but `fit()` does not
return within `grace_s`, it lets the trial end (Ray removes the finished run's actors and reservation with it).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field

from ray.train.v2.api.callback import UserCallback

from .protocol import FINISHED, REPLAYED
from .storage import fetch_path

DONE_FILE_POLL_S = 5.0  # how often a quiet trial looks for its done file (a remote store pulls it)


class QueueReportCallback(UserCallback):
    """Runs in Ray Train's controller: puts rank 0's every report on the trial's queue actor."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put(dict(metrics[0]))


def report_done(storage: str, done_path: str, replayed: bool = True) -> bool:
    """Reports a trial's end from its done file: `replayed`, a trial that had ended before a driver crash (it is
    not trained again); else a live trial whose final report Ray lost. False when there is no done file."""
    import ray.tune

    if not (done_path and fetch_path(storage, done_path)):
        return False
    with open(done_path) as f:
        ray.tune.report({**json.load(f), **({REPLAYED: True} if replayed else {})})
    return True


@dataclass
class TrainRelay:
    """Runs `make_trainer(callbacks).fit()` and relays its reports to Tune; see the module's docstring."""
    done_path: str = ""
    storage: str = ""
    grace_s: float = 60.0
    final_seen_s: float | None = None
    done_seen_s: float | None = None
    last_look_s: float = 0.0
    outcome: dict = field(default_factory=dict)

    def run(self, make_trainer) -> None:
        from ray.util.queue import Queue

        reports = Queue(actor_options={"num_cpus": 0})
        trainer = make_trainer([QueueReportCallback(reports)])
        fit = threading.Thread(target=self._fit, args=(trainer,), name="ray-train-fit", daemon=True)
        fit.start()
        while True:
            self._relay_one(reports, block=True)
            if not fit.is_alive():
                while self._relay_one(reports, block=False):
                    pass
                break
            if self._gave_up():
                return
        fit.join()
        if "error" in self.outcome:
            raise self.outcome["error"]

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as error:  # raised again in the trial's thread, where Tune records it
            self.outcome["error"] = error

    def _relay_one(self, reports, block: bool) -> bool:
        """Relays one report if there is one (waiting up to 2 s for it when `block`); whether it relayed one."""
        import ray.tune
        from ray.util.queue import Empty

        try:
            metrics = reports.get(block=block, timeout=2.0 if block else None)
        except Empty:
            return False
        if metrics.get(FINISHED):
            self.final_seen_s = time.time()
        ray.tune.report(metrics)
        return True

    def _gave_up(self) -> bool:
        """Whether to end the trial now without `fit()`: its end is known, Ray's run of it is not over."""
        now = time.time()
        if self.final_seen_s is not None:
            if now - self.final_seen_s < self.grace_s:
                return False
            print(f"warning: Ray Train's fit() had not returned {self.grace_s:.0f}s after the trial's final report; "
                  "ending the trial with it", file=sys.stderr, flush=True)
            return True
        if not self.done_path or now - self.last_look_s < DONE_FILE_POLL_S:
            return False
        self.last_look_s = now
        if self.done_seen_s is None:
            if fetch_path(self.storage, self.done_path):
                self.done_seen_s = now
            return False
        if now - self.done_seen_s < self.grace_s:
            return False
        print(f"warning: the trial's final report had not reached Tune {self.grace_s:.0f}s after its done file was "
              "written; reporting the done file's end", file=sys.stderr, flush=True)
        return report_done(self.storage, self.done_path, replayed=False)
