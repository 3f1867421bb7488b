"""A search space over a contributor's own train_gpt.py: its knobs (sweeps.knobs) and environment variables.

The space file has the shape of the shipped spaces (description, defaults, fixed, params, points, objective,
sampler), but its keys are the file's own names (`Muon.lr`, `Hyperparameters.cooldown_frac`, `WARMUP`) or
environment variables (`env.NUM_ITERS`). Each key must resolve to exactly one place in the file; trial 0 (the
control) is the file as it is: its literal values, and the environment given with --env.
"""

from __future__ import annotations

import ast
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .knobs import KnobError, Knob, find_knobs, resolve
from .spaces import Param, Space, SpaceError, _check_space, _parse_param

ENV_PREFIX = "env."


def split_params(params: dict) -> tuple[dict, dict]:
    """(file knobs, environment variables) of a trial's params."""
    knobs = {k: v for k, v in params.items() if not k.startswith(ENV_PREFIX)}
    env = {k[len(ENV_PREFIX):]: str(v) for k, v in params.items() if k.startswith(ENV_PREFIX)}
    return knobs, env


@dataclass(frozen=True)
class ScriptConfig:
    """What a script trial runs: the file, its knob values and environment (the tracker's trial config)."""
    trainer: str
    params: dict
    env: dict

    def to_dict(self) -> dict:
        return {"trainer": self.trainer, **{f"{ENV_PREFIX}{k}": v for k, v in sorted(self.env.items())
                                            if not k.startswith(("SPEEDRUN_", "RAY_", "TORCHINDUCTOR", "TRITON"))},
                **self.params}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, default=str)


@dataclass(frozen=True)
class ScriptSpace(Space):
    trainer: str = ""
    base_env: dict = field(default_factory=dict)  # --env: the control's environment

    def base_config(self):
        raise TypeError("a script space has no TrainConfig: use trial_config")

    def control_point(self) -> dict[str, Any]:
        knobs = find_knobs(Path(self.trainer).read_text(), self.trainer)
        out = {}
        for p in self.params:
            if p.key.startswith(ENV_PREFIX):
                out[p.key] = _cast(p, self.base_env[p.key[len(ENV_PREFIX):]])
            else:
                out[p.key] = ast.literal_eval(resolve(knobs, p.key, self.trainer).value)
        return out

    def points_by_graphs(self, steps: int | None = None) -> list[dict[str, Any]]:
        return [self.control_point(), *map(dict, self.points)]

    def trial_config(self, params: dict[str, Any], steps: int | None = None) -> ScriptConfig:
        return ScriptConfig(self.trainer, {**self.fixed, **params}, dict(self.base_env))


def _cast(p: Param, text: str):
    if p.type == "int":
        return int(text)
    if p.type == "float":
        return float(text)
    return next((c for c in p.choices if str(c) == text), text)


def _check_param(key: str, knobs: list[Knob], env: dict, trainer: str, fail) -> None:
    """A searched key is an environment variable given with --env, or one knob of the file with a literal value."""
    if key.startswith(ENV_PREFIX):
        if key[len(ENV_PREFIX):] not in env:
            raise fail(f"params.{key}: give the control's value with --env {key[len(ENV_PREFIX):]}=VALUE")
        return
    try:
        knob = resolve(knobs, key, trainer)
    except KnobError as e:
        raise fail(f"params.{key}: {e}") from None
    try:
        ast.literal_eval(knob.value)
    except (ValueError, SyntaxError):
        raise fail(f"params.{key}: its value on line {knob.line} is not a literal ({knob.value}), so the file "
                   f"has no control value; sweep an environment variable it reads instead, or write a literal") from None


def load_script_space(space_path: str, trainer: str, env: dict[str, str]) -> ScriptSpace:
    """A space file for `trainer`, every key resolved in the file (SpaceError naming the key and the fix)."""
    path = Path(space_path)
    if path.suffix != ".toml" or not path.exists():
        raise SpaceError(f"--space {space_path}: with --trainer, give a .toml space file whose params are the file's "
                         f"knobs (see --list-knobs {trainer})")
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"{where}: not valid TOML: {e}") from None
    unknown = set(raw) - {"description", "metric", "mode", "defaults", "fixed", "params", "points", "objective",
                          "sampler"}
    if unknown:
        raise SpaceError(f"{where}: unknown top-level keys {sorted(unknown)}")
    if not raw.get("params"):
        raise SpaceError(f"{where}: no [params.\"NAME\"] tables: a space needs at least one knob")
    try:
        knobs = find_knobs(Path(trainer).read_text(), trainer)
    except KnobError as e:
        raise SpaceError(str(e)) from None

    def fail(msg: str) -> SpaceError:
        return SpaceError(f"{where}: {msg}")

    params = []
    for key, spec in raw["params"].items():
        params.append(_parse_param(key, spec, "script", fail))
        _check_param(key, knobs, env, trainer, fail)
    for key in raw.get("fixed", {}):
        if not key.startswith(ENV_PREFIX):
            try:
                resolve(knobs, key, trainer)
            except KnobError as e:
                raise fail(f"fixed.{key}: {e}") from None
    defaults = raw.get("defaults", {})
    space = ScriptSpace(
        name=path.stem, description=raw.get("description", ""), preset="script", params=tuple(params),
        fixed=dict(raw.get("fixed", {})), points=tuple(raw.get("points", ())), metric=raw.get("metric", "val_loss"),
        mode=raw.get("mode", "min"), trials=int(defaults.get("trials", 8)), steps=int(defaults.get("steps", 0)),
        grace_fraction=float(defaults.get("grace_fraction", 0.25)), objective=raw.get("objective", "loss"),
        sampler=raw.get("sampler"), path=path, trainer=str(Path(trainer).resolve()), base_env=dict(env))
    _check_space(space, "script", fail, control_from="the file")
    return space
