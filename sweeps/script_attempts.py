"""Record attempts of a contributor's own train_gpt.py (`record.py --trainer PATH`): fresh runs of the file with its
knobs set by `--set Muon.lr=0.04` and its environment by `--env`, optionally interleaved with the runs of a
baseline file (`--baseline PATH.py`, run as it is), through the script trial unit on Ray (sweeps.script_trial) or
one after another under torchrun (`--torchrun`).

A file that takes a seed from its environment gets each run's own with `--seed-env NAME`; otherwise runs differ only
by what the file leaves to chance (the public trainer's data order is fixed; its kernels are not deterministic).
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .attempts import BASELINE_ARM, CANDIDATE_ARM, attempt_space
from .cluster import BadInput
from .knobs import KnobError, find_knobs, resolve, set_knobs
from .protocol import TrialStatus
from .script_space import ENV_PREFIX, ScriptConfig
from .script_trial import ScriptSpec, prepare_code


@dataclass(frozen=True)
class ScriptAttemptSpec(ScriptSpec):
    """A ScriptSpec whose trial runs its seed's arm: that arm's file with that arm's knobs."""
    arms: tuple = ()  # ((arm name, absolute path, ((knob, value), ...)), ...)
    arm_of_seed: tuple = ()  # ((seed, arm name), ...)
    seed_env: str = ""  # the environment variable the file reads its seed from ("" = none)

    def _arm(self, params: dict) -> tuple[str, int, str, dict, dict]:
        seed = int(params["run.seed"])
        arm = dict(self.arm_of_seed)[seed]
        source, knobs = {a: (path, dict(k)) for a, path, k in self.arms}[arm]
        return arm, seed, source, knobs, ({self.seed_env: str(seed)} if self.seed_env else {})

    def trial_code(self, config: dict) -> tuple[str, dict]:
        _, _, source, knobs, env = self._arm(config)
        return source, {**knobs, **{ENV_PREFIX + k: v for k, v in env.items()}}

    def config_for(self, params: dict) -> ScriptConfig:
        _, _, source, knobs, env = self._arm(params)
        return ScriptConfig(source, knobs, {**self.env, **env})

    def tags_for(self, params: dict) -> dict:
        arm, seed, *_ = self._arm(params)
        return {"arm": arm, "seed": str(seed)}


def parse_knob_sets(items: list[str], trainer: Path) -> dict[str, object]:
    """`--set Muon.lr=0.04` items as {knob: value}, every knob resolved in the file and the patch tried."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise BadInput(f"--set {item!r}: expected KNOB=VALUE with the file's own names, e.g. --set Muon.lr=0.04")
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise BadInput(f"--set {item!r}: {text!r} is not a Python literal (0.04, 128, (0.9, 0.95), 'x')") from None
    try:
        source = trainer.read_text()
        knobs = find_knobs(source, str(trainer))
        for key in values:
            resolve(knobs, key, str(trainer))
        set_knobs(source, values, trainer.name)
    except KnobError as e:
        raise BadInput(f"--set: {e} (see --list-knobs {trainer})") from None
    return values


def script_file(path: str, flag: str) -> Path:
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise BadInput(f"{flag} {path}: no such Python file: give the path of a train_gpt.py")
    return file


def script_arms(args) -> dict[str, tuple[str, dict]]:
    """arm -> (file, knob values): the candidate is --trainer with --set; the baseline, --baseline as it is."""
    for flag in ("run_id", "space", "config", "preset"):
        if getattr(args, flag):
            raise BadInput(f"--{flag.replace('_', '-')} picks a speedrun config; with --trainer the candidate is the "
                           "file with its --set knobs")
    trainer = script_file(args.trainer, "--trainer")
    arms = {CANDIDATE_ARM: (str(trainer), parse_knob_sets(args.sets, trainer))}
    if args.baseline:
        arms[BASELINE_ARM] = (str(script_file(args.baseline, "--baseline")), {})
    return arms


def make_script_attempt_spec(base: ScriptSpec, name: str, arms: dict, order: list[tuple[int, str]],
                             seed_env: str) -> ScriptAttemptSpec:
    fields = {f: getattr(base, f) for f in ScriptSpec.__dataclass_fields__}
    fields.update(space=attempt_space(name, [s for s, _ in order]),
                  arms=tuple((arm, path, tuple(knobs.items())) for arm, (path, knobs) in arms.items()),
                  arm_of_seed=tuple(order), seed_env=seed_env)
    return ScriptAttemptSpec(**fields)


def run_with_torchrun(arms: dict, env: dict, order, folder: Path, nproc: int, seed_env: str) -> list[dict]:
    """Without Ray: each run's patched copy under `torchrun --standalone`, in order; its stdout is its log."""
    from .speedrun_logs import LogError, parse_log

    out = []
    for seed, arm in order:
        source, knobs = arms[arm]
        run_env = {seed_env: str(seed)} if seed_env else {}
        script, _ = prepare_code(source, folder / "runs" / f"{arm}_seed{seed}", knobs)
        log = script.parent / "stdout.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
        print(f"run seed {seed} ({arm}): {' '.join(cmd[2:])}", flush=True)
        with open(log, "w") as f:
            code = subprocess.run(cmd, cwd=script.parent, env={**os.environ, **env, **run_env}, stdout=f,
                                  stderr=subprocess.STDOUT, check=False).returncode
        try:
            run = parse_log(log)
        except LogError:
            run = None
        ok = run is not None and run.complete  # a crash after the final validation keeps the run, as in sweeps
        if not ok or code != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-10:])
            what = "exited with {code} after its final validation line; its result is kept" if ok else "failed (exit {code})"
            print(f"{'warning: ' if ok else ''}run seed {seed} ({arm}) {what.format(code=code)}; last lines of {log}:\n"
                  f"{tail}", flush=True)
        row = {"run": f"seed {seed}", "arm": arm, "status": TrialStatus.FINISHED if ok else TrialStatus.FAILED,
               "val_loss": run.val_loss if ok else math.nan, "train_time_s": run.train_time_s if run else math.nan}
        out.append({**row, "script_exit_code": code} if code != 0 else row)
    return out
