"""The sweep's stall watchdog: a trial that reports nothing for too long (a hung collective, workers that never
start, a Ray Train start-up that never returns) is killed and recorded as failed with that reason, so that one hung
trial cannot hold a sweep for ever (a 20-trial soak once waited 25 minutes on one in CI, its Tune loop alive)."""

from __future__ import annotations

import time

from ray import tune


class StallWatchdog(tune.Callback):
    """Driver side. A running trial may be silent for `startup_s + stall_s` seconds before its first report (waiting
    for resources, then compiling) and for `stall_s` seconds between reports; past that, its trial actor is killed
    (Ray then ends its Ray Train controller and workers) and Tune records it as failed; the reason ends its error.txt,
    where the progress line, the results and MLflow's `error` tag read it. Under --reuse-workers (`host_prefix`,
    `hosts`) the trial runs in a warm host, not in its trial actor: that host is killed instead, Ray starts it afresh
    and the trial runs again as after a crash (up to --max-failures times), each attempt with a fresh allowance.
    stall_s <= 0 turns the watchdog off."""

    def __init__(self, stall_s: float, startup_s: float, host_prefix: str = "", hosts: int = 0):
        self.stall_s, self.startup_s = stall_s, startup_s
        self.host_prefix, self.hosts = host_prefix, hosts
        self.heard: dict[str, tuple[float, bool]] = {}  # trial id -> (when it started or last reported, reported)
        self.killed: dict[str, str] = {}  # trial id -> the reason

    def __getstate__(self):  # pickled with the experiment: a resumed sweep starts its clocks afresh
        return {**self.__dict__, "heard": {}, "killed": {}}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.heard[trial.trial_id] = (time.monotonic(), False)
        self.killed.pop(trial.trial_id, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.heard[trial.trial_id] = (time.monotonic(), True)

    def on_step_end(self, iteration, trials, **info):
        if self.stall_s <= 0:
            return
        now = time.monotonic()
        for trial in trials:
            if trial.status != "RUNNING" or (trial.trial_id in self.killed and not self.hosts):
                continue
            since, reported = self.heard.setdefault(trial.trial_id, (now, False))
            allowed = self.stall_s if reported else self.startup_s + self.stall_s
            if now - since > allowed and trial.temporary_state.ray_actor is not None:
                self.kill(trial, now - since, reported)

    def kill(self, trial, silent_s: float, reported: bool) -> None:
        import ray

        what = "since its last report" if reported else "since it started, without a report"
        reason = (f"stalled: nothing heard for {silent_s:.0f}s {what}; the sweep killed it "
                  f"(--stall-timeout {self.stall_s:.0f})")
        if not self.hosts:
            self.killed[trial.trial_id] = reason
            ray.kill(trial.temporary_state.ray_actor, no_restart=True)
            return
        from .trial_hosts import restart_host_of

        if restart_host_of(self.host_prefix, self.hosts, trial.trial_id):
            self.killed[trial.trial_id] = reason
        # its next attempt (or, with no host holding it yet, its wait for one) gets a fresh allowance
        self.heard[trial.trial_id] = (time.monotonic(), False)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = self.killed.get(trial.trial_id)
        if reason and trial.error_file:  # Tune has written the actor's death there; the last line says why
            with open(trial.error_file, "a") as f:
                f.write(f"\n{reason}\n")
