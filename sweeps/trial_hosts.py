"""Warm trial hosts (`--reuse-workers`): one long-lived trainer process per trial slot that runs the sweep's
one-worker trials one after another, so a trial finds in memory what torch compiled for the trials before it
(a knob that is a tensor in the compiled graphs recompiles nothing) and pays no process start.

The sweep driver owns the hosts (Ray actors holding one worker's CPUs/GPUs each) and kills them at its end.
A Tune trial claims a free host, hands it the trial's config and forwards the host's reports to Tune. Each
trial builds its own trainer (seeded weights, optimiser, data position) and drops it at its end, so only
compiled code carries over. When the scheduler stops a trial (a pruned one), Tune leaves its trainable blocked
for good; a driver callback (StopHostedTrials) tells the hosts, and the one running it stops it at its next
report. A host whose trial nobody has polled for ABANDON_S (a lost trainable) stops it too. A host process that
dies (a crash, a fault injected by a test) is restarted by Ray; the trial runs again, up to --max-failures
times, as Ray Train would run it again.
"""

from __future__ import annotations

import gc
import os
import threading
import time

from ray import tune

from .protocol import FINISHED

ABANDON_S = 120.0  # a trial whose owner has not polled its host for this long is stopped at its next report
POLL_S = 1.0  # how long one poll waits for the next report


class TrialAbandoned(Exception):
    """Raised inside a host's running trial once nobody is listening (Tune stopped the trial)."""


class TrialHost:
    """The Ray actor (created with max_concurrency > 1: `poll` runs beside `run`)."""

    def __init__(self, abandon_s: float = ABANDON_S):
        self.abandon_s = abandon_s
        self.cond = threading.Condition()
        self.owner: str | None = None
        self.stopping: str | None = None  # the trial the scheduler stopped, while it still runs here
        self.last_poll = 0.0
        self.running = False
        self.reports: list[dict] = []
        self.done = False
        self.trials_run = 0

    def claim(self, owner: str) -> bool:
        """Take the host for trial `owner` if it is free (or its claimant never started, or stopped polling)."""
        with self.cond:
            now = time.monotonic()
            stale = self.owner is not None and not self.running and now - self.last_poll > self.abandon_s
            if self.owner not in (None, owner) and not stale:
                return False
            self.owner, self.last_poll = owner, now
            self.reports, self.done = [], False
            return True

    def run(self, owner: str, loop_config: dict) -> dict:
        """Run the claimed trial to its end; what it reported goes to `poll`. Returns what the host says of itself."""
        from .trial import train_one

        with self.cond:
            if self.owner != owner:
                raise RuntimeError(f"trial {owner} runs on a host it does not hold")
            self.running = True
        reused = {"host_pid": os.getpid(), "host_trials_before": self.trials_run}
        try:
            train_one(loop_config, 0, lambda m: self._send(owner, m), extra=reused)
            return reused
        except TrialAbandoned as stop:  # caught here, so that its traceback (and the trainer it holds) goes now
            return {**reused, "stopped": str(stop)}
        finally:
            self.trials_run += 1
            gc.collect()  # the trial's trainer, model and optimiser go before the next trial's are built
            empty_cuda_cache()
            with self.cond:  # the owner's last poll frees the host, once it has every report
                if self.stopping == owner:  # ... but no one polls a stopped trial
                    self.owner = None
                self.running, self.done, self.stopping = False, True, None
                self.cond.notify_all()

    def stop(self, owner: str) -> None:
        """The scheduler stopped trial `owner`: if it runs here, it ends at its next report."""
        with self.cond:
            if self.owner == owner and self.running:
                self.stopping = owner

    def _send(self, owner: str, metrics: dict) -> None:
        with self.cond:
            if self.stopping == owner:
                raise TrialAbandoned(f"trial {owner}: stopped by the scheduler")
            if time.monotonic() - self.last_poll > self.abandon_s:
                self.stopping = owner
                raise TrialAbandoned(f"trial {owner}: no one has polled its host for {self.abandon_s:.0f}s")
            self.reports.append(metrics)
            self.cond.notify_all()

    def poll(self, owner: str, wait_s: float = POLL_S) -> tuple[list[dict], bool]:
        """(reports since the last poll, whether the trial has ended); waits up to wait_s for something new."""
        with self.cond:
            if self.owner != owner:
                return [], True
            self.last_poll = time.monotonic()
            self.cond.wait_for(lambda: self.reports or self.done, timeout=wait_s)
            out, self.reports = self.reports, []
            if self.done:
                self.owner = None
            return out, self.done

    def pid(self) -> int:
        return os.getpid()

    def holder(self) -> str | None:
        """The trial this host runs or is claimed for (read without the lock: a hung trial may hold it)."""
        return self.owner


def empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def host_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


def start_hosts(count: int, resources: dict, timeout_s: float, prefix: str, abandon_s: float = ABANDON_S) -> tuple:
    """`count` hosts named `prefix`-i, each holding `resources` ({"CPU": c, "GPU": g}); TimeoutError when they
    cannot all be placed within timeout_s."""
    import ray

    actor = ray.remote(TrialHost)
    hosts = tuple(actor.options(name=name, num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0),
                                max_concurrency=4, max_restarts=-1).remote(abandon_s)
                  for name in host_names(prefix, count))
    ready, _ = ray.wait([h.pid.remote() for h in hosts], num_returns=count, timeout=timeout_s)
    if len(ready) < count:
        stop_hosts(hosts)
        raise TimeoutError(f"--reuse-workers: {count} trial hosts of {resources} could not all start within "
                           f"{timeout_s:.0f}s: lower --concurrency or free the resources")
    return hosts


def stop_hosts(hosts: tuple) -> None:
    import ray

    for host in hosts:
        ray.kill(host, no_restart=True)


def restart_host_of(prefix: str, count: int, owner: str) -> bool:
    """Kill the host (found by name) that runs trial `owner`, for Ray to start afresh: the trial's relay then runs it
    again, up to --max-failures times, as after a crash. False when no host holds it."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    for name in host_names(prefix, count):
        try:
            host = ray.get_actor(name)
            if ray.get(host.holder.remote(), timeout=10) == owner:
                ray.kill(host, no_restart=False)
                return True
        except (ValueError, RayActorError, GetTimeoutError):  # gone, restarting, or too busy to answer
            continue
    return False


def claim_host(hosts: tuple, owner: str, first: int):
    """A free host for trial `owner`, trying the one at `first` (its trial index) first; waits while all are busy
    (a stopped trial's host finishes it at its next report)."""
    import ray
    from ray.exceptions import RayActorError

    order = [hosts[(first + i) % len(hosts)] for i in range(len(hosts))]
    while True:
        for host in order:
            try:
                if ray.get(host.claim.remote(owner)):
                    return host
            except RayActorError:  # restarting after a death (ActorUnavailableError): try it again later
                continue
        time.sleep(POLL_S)


def run_hosted_trial(config: dict, spec) -> None:
    """The Tune trainable of --reuse-workers: the trial on a warm host, its reports forwarded to Tune; a host that
    dies mid-trial is restarted by Ray and the trial runs again (up to --max-failures times)."""
    import ray
    import ray.tune
    from ray.exceptions import RayActorError

    from .trial import trial_loop_config

    loop_config = trial_loop_config(config, spec)
    if loop_config is None:
        return
    owner = loop_config["trial_id"]
    for _ in range(spec.max_failures + 1):
        host = claim_host(spec.hosts, owner, loop_config["trial_index"])
        done = host.run.remote(owner, loop_config)
        try:
            while True:
                reports, ended = ray.get(host.poll.remote(owner))
                for metrics in reports:
                    ray.tune.report(metrics)
                if ended:
                    break
        except RayActorError:
            continue  # Ray restarts the host; the trial runs again from its start, as under Ray Train
        try:
            said = ray.get(done)
        except RayActorError:
            continue  # died after its last report: run it again
        except Exception:
            ray.kill(host, no_restart=False)  # a fresh process for the next trial: a CUDA error would poison it
            raise
        if "stopped" in said:  # this trainable was too slow to poll (over ABANDON_S): the host gave up on it
            raise RuntimeError(f"the trial's host stopped it: {said['stopped']}")
        return
    raise RuntimeError(f"the trial's host process died on each of {spec.max_failures + 1} attempts "
                       "(see its worker log in Ray's session folder)")


class StopHostedTrials(tune.Callback):
    """Driver side: when the scheduler stops a trial, tell the hosts (found by name, so that a resumed sweep's
    pickled callback finds the new driver's hosts); the one running it stops it at its next report."""

    def __init__(self, prefix: str, count: int):
        self.prefix, self.count = prefix, count

    def on_trial_complete(self, iteration, trials, trial, **info):
        import ray

        if (trial.last_result or {}).get(FINISHED):
            return
        for name in host_names(self.prefix, self.count):
            try:
                ray.get_actor(name).stop.remote(trial.trial_id)
            except ValueError:  # no such host (any more)
                continue
