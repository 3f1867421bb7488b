"""Named search spaces: declarative TOML files in search_spaces/, loaded and validated against TrainConfig.

A space file holds a description, the metric and mode, defaults (trials and step budget per preset, ASHA
grace fraction), `fixed` overrides, optional `points` to evaluate first, and `params`: distributions keyed
by TrainConfig dotted names (float / int, optionally log; categorical). A bound may be a number or a table
keyed by preset (`low = { record = 300, tiny = 60 }`) for knobs measured in steps.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speedrun.config import TrainConfig, graph_signature, recompiles

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


class SpaceError(ValueError):
    """A space that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Param:
    key: str
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} {self.type}{' log' if self.log else ''} [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    preset: str
    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    points: tuple[dict[str, Any], ...] = ()
    metric: str = "val_loss"
    mode: str = "min"
    trials: int = 8
    steps: int = 0  # 0: the preset's own schedule length
    grace_fraction: float = 0.25
    compile_cost: str = "none"  # "recompiles": some knob changes compiled graphs (see _compile_cost)
    objective: str = "loss"  # loss | time | pareto (sweeps.search.OBJECTIVES)
    sampler: str | None = None  # tpe | gp | cmaes | random (sweeps.samplers); None: the default
    path: Path | None = None

    def base_config(self) -> TrainConfig:
        return TrainConfig.preset(self.preset).override(self.fixed)

    def control_point(self) -> dict[str, Any]:
        """The base config's value of every searched knob: trial 0, the control arm."""
        flat = self.base_config().to_dict()
        return {p.key: _lookup(flat, p.key) for p in self.params}

    def points_by_graphs(self, steps: int | None = None) -> list[dict[str, Any]]:
        """The control, then the space's points with those that compile the same graphs as an earlier one
        moved up next to it (stable otherwise): one after another they reuse the sweep's compile cache."""
        import json

        points = [self.control_point(), *map(dict, self.points)]
        signature = [json.dumps(graph_signature(self.trial_config(p, steps)), sort_keys=True) for p in points]
        first = {}
        for i, sig in enumerate(signature):
            first.setdefault(sig, i)
        order = sorted(range(len(points)), key=lambda i: (first[signature[i]], i))
        return [points[i] for i in order]

    def trial_config(self, params: dict[str, Any], steps: int | None = None) -> TrainConfig:
        """Base preset + fixed + params (in the preset's own steps), then compressed to the step budget."""
        cfg = self.base_config().override(params)
        steps = self.steps if steps is None else steps
        return cfg.with_total_steps(steps) if steps else cfg


def available_spaces(directory: Path = SPACES_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.glob("*.toml"))}


def load_space(name_or_path: str, preset: str, directory: Path = SPACES_DIR) -> Space:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        known = available_spaces(directory)
        if name_or_path not in known:
            raise SpaceError(f"unknown space {name_or_path!r}: known spaces are {', '.join(known) or '(none)'} "
                             f"(or pass a .toml file)")
        path = known[name_or_path]
    if not path.exists():
        raise SpaceError(f"space file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"{path}: not valid TOML: {e}") from None
    return parse_space(raw, path.stem, preset, path)


def parse_space(raw: dict, name: str, preset: str, path: Path | None = None) -> Space:
    where = str(path or name)

    def fail(msg: str) -> SpaceError:
        return SpaceError(f"{where}: {msg}")

    unknown = set(raw) - {"description", "metric", "mode", "defaults", "fixed", "params", "points", "compile_cost",
                           "objective", "sampler"}
    if unknown:
        raise fail(f"unknown top-level keys {sorted(unknown)}")
    if not raw.get("params"):
        raise fail("no [params.\"section.knob\"] tables: a space needs at least one parameter")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise fail(f"mode={mode!r}: must be min or max")
    objective = raw.get("objective", "loss")
    if objective not in ("loss", "time", "pareto"):
        raise fail(f"objective={objective!r}: must be loss, time or pareto")
    sampler = raw.get("sampler")
    if sampler is not None and sampler not in ("tpe", "gp", "cmaes", "random"):
        raise fail(f"sampler={sampler!r}: must be tpe, gp, cmaes or random")
    defaults = raw.get("defaults", {})
    try:
        base = TrainConfig.preset(preset)
    except ValueError as e:
        raise fail(str(e)) from None
    fixed = dict(raw.get("fixed", {}))
    try:
        base = base.override(fixed)
    except ValueError as e:
        raise fail(f"[fixed]: {e}") from None

    params = []
    for key, spec in raw["params"].items():
        params.append(_parse_param(key, spec, preset, fail))
        p = params[-1]
        probes = list(p.choices) if p.type == "categorical" else [p.low, p.high]
        for value in probes:
            try:
                base.override({key: value})
            except ValueError as e:
                raise fail(f"params.{key}: value {value!r} is not valid for the {preset} preset: {e}") from None
    space = Space(
        name=name, description=raw.get("description", ""), preset=preset, params=tuple(params), fixed=fixed,
        points=tuple(raw.get("points", ())), metric=raw.get("metric", "val_loss"), mode=mode,
        trials=int(_per_preset(defaults.get("trials", 8), preset, "defaults.trials", fail)),
        steps=int(_per_preset(defaults.get("steps", 0), preset, "defaults.steps", fail)),
        grace_fraction=float(defaults.get("grace_fraction", 0.25)),
        compile_cost=_compile_cost(raw.get("compile_cost"), params, fail), objective=objective, sampler=sampler,
        path=path,
    )
    _check_space(space, preset, fail)
    return space


def _check_space(space: Space, preset: str, fail, control_from: str | None = None) -> None:
    """A parsed space's defaults, control point and points make sense for the preset (the control's values come
    from `control_from`, default "the PRESET preset")."""
    if space.trials < 1:
        raise fail("defaults.trials must be >= 1")
    if not 0 < space.grace_fraction <= 1:
        raise fail("defaults.grace_fraction must be in (0, 1]")
    control = space.control_point()
    for p in space.params:
        if not p.contains(control[p.key]):
            source = control_from or f"the {preset} preset"
            raise fail(f"params.{p.key}: {source}'s value {control[p.key]!r} lies outside {p.describe()}: widen the "
                       f"range so trial 0 can be the control")
    for i, point in enumerate(space.points):
        missing = {p.key for p in space.params} - set(point)
        if missing:
            raise fail(f"points[{i}] lacks {sorted(missing)}")
        for p in space.params:
            if not p.contains(point[p.key]):
                raise fail(f"points[{i}]: {p.key}={point[p.key]!r} lies outside {p.describe()}")
    try:
        space.trial_config(control)
    except ValueError as e:
        raise fail(f"defaults.steps={space.steps}: {e}") from None


def _compile_cost(declared: str | None, params: list[Param], fail) -> str:
    """What the space's knobs cost in compilation: "recompiles" when a knob is baked into compiled graphs
    (speedrun.config.recompiles: shapes, layer switches), so trials with new values compile their own graphs;
    "none" when every knob reaches compiled code as a tensor, so all trials share the first one's graphs.
    A declared value must agree with what the trainer does."""
    shaping = [p.key for p in params if recompiles(p.key)]
    actual = "recompiles" if shaping else "none"
    if declared is not None and declared != actual:
        why = (f"{', '.join(shaping)} change compiled graphs" if shaping
               else "every knob reaches compiled code as a tensor")
        raise fail(f"compile_cost = {declared!r}, but {why}: set compile_cost = {actual!r} or drop the line")
    return actual


def _parse_param(key: str, spec: dict, preset: str, fail) -> Param:
    kind = spec.get("type")
    if kind == "categorical":
        choices = tuple(spec.get("choices", ()))
        if not choices:
            raise fail(f"params.{key}: categorical needs a non-empty 'choices' list")
        return Param(key, kind, choices=choices)
    if kind not in ("float", "int"):
        raise fail(f"params.{key}: type={kind!r}: must be float, int or categorical")
    low = _per_preset(spec.get("low"), preset, f"params.{key}.low", fail)
    high = _per_preset(spec.get("high"), preset, f"params.{key}.high", fail)
    if low is None or high is None:
        raise fail(f"params.{key}: needs both low and high")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise fail(f"params.{key}: int bounds must be whole numbers (got {low}, {high})")
    if low > high:
        raise fail(f"params.{key}: low={low} > high={high}: swap them")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise fail(f"params.{key}: log=true needs low > 0 (got {low})")
    if any(isinstance(v, float) and not math.isfinite(v) for v in (low, high)):
        raise fail(f"params.{key}: bounds must be finite")
    cast = int if kind == "int" else float
    return Param(key, kind, cast(low), cast(high), log)


def _per_preset(value: Any, preset: str, what: str, fail) -> Any:
    """A space's per-preset value; a derived preset ("record-sample") takes its family's ("record"), and another
    full-size preset ("public-2508") the record's."""
    if isinstance(value, dict):
        preset = preset if preset in value else preset.split("-")[0]
        if preset not in value and preset != "tiny" and "record" in value:
            preset = "record"
        if preset not in value:
            raise fail(f"{what} has no value for preset {preset!r} (has {sorted(value)})")
        return value[preset]
    return value


def _lookup(flat: dict[str, Any], key: str) -> Any:
    parts = key.split(".")
    if len(parts) == 3:
        return flat[".".join(parts[:2])][int(parts[2])]
    return flat[key]
