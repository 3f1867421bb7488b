"""The knobs of a contributor's own train_gpt.py, found by parsing it (ast), and a copy of it with knobs set.

A knob is named by the file's own names:
- `Class.field`: an assignment in a module-level class body (the hyperparameter class: `Hyperparameters.cooldown_frac`),
  whatever its value expression;
- `NAME`: a module-level assignment of a literal (`WARMUP_STEPS = 100`);
- `Callee.keyword`: a literal keyword argument of a call, named by the called name (`Muon.lr`, `DistAdam.betas`).

A name that matches more than one place (two calls of `Muon`) or none is refused with the candidates and
their line numbers. Setting a knob replaces exactly the source of its value expression with the new value's
literal, so the rest of the file (comments, formatting) is untouched and the diff shows only the knobs.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
from dataclasses import dataclass


class KnobError(ValueError):
    """A knob that cannot be resolved in the file; the message lists the candidates and the fix."""


@dataclass(frozen=True)
class Knob:
    name: str
    kind: str  # field | assignment | keyword
    line: int
    start: tuple[int, int]  # (line, column) of the value expression, 1-based lines, 0-based columns
    end: tuple[int, int]
    value: str  # the value expression's source

    def describe(self) -> str:
        return f"{self.name} = {self.value}  (line {self.line}, {self.kind})"


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _knob(name: str, kind: str, line: int, value: ast.expr, source: str) -> Knob:
    return Knob(name, kind, line, (value.lineno, value.col_offset), (value.end_lineno, value.end_col_offset),
                ast.get_source_segment(source, value) or "")


def _targets(stmt: ast.stmt) -> list[tuple[str, ast.expr]]:
    if isinstance(stmt, ast.Assign) and stmt.value is not None:
        return [(t.id, stmt.value) for t in stmt.targets if isinstance(t, ast.Name)][:1]
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
        return [(stmt.target.id, stmt.value)]
    return []


def find_knobs(source: str, filename: str = "<train_gpt.py>") -> list[Knob]:
    """Every place in the file a sweep can set, in file order."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as e:
        raise KnobError(f"{filename}: not valid Python ({e.msg}, line {e.lineno})") from None
    knobs = []
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            for inner in stmt.body:
                for name, value in _targets(inner):
                    knobs.append(_knob(f"{stmt.name}.{name}", "field", inner.lineno, value, source))
        for name, value in _targets(stmt):
            if _is_literal(value):
                knobs.append(_knob(name, "assignment", stmt.lineno, value, source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node):
            for kw in node.keywords:
                if kw.arg and _is_literal(kw.value):
                    knobs.append(_knob(f"{_callee(node)}.{kw.arg}", "keyword", kw.value.lineno, kw.value, source))
    return sorted(knobs, key=lambda k: (k.start, k.name))


def resolve(knobs: list[Knob], name: str, filename: str = "train_gpt.py") -> Knob:
    matches = [k for k in knobs if k.name == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        where = "; ".join(f"line {k.line}: {k.value}" for k in matches)
        raise KnobError(f"knob {name!r} is ambiguous in {filename}: {len(matches)} places ({where}); "
                        f"give the call or assignment its own name in your copy, or sweep another knob")
    close = difflib.get_close_matches(name, sorted({k.name for k in knobs}), n=5, cutoff=0.5)
    hint = ", ".join(f"{k.name} (line {k.line})" for c in close for k in knobs if k.name == c)
    raise KnobError(f"no knob {name!r} in {filename}: " + (f"did you mean {hint}? " if hint else "")
                    + f"list them with --list-knobs {filename}")


def set_knobs(source: str, values: dict[str, object], filename: str = "train_gpt.py") -> str:
    """The file with each named knob's value expression replaced by the value's literal."""
    knobs = find_knobs(source, filename)
    chosen = [(resolve(knobs, name, filename), value) for name, value in values.items()]
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def index(pos: tuple[int, int]) -> int:  # ast columns count UTF-8 bytes
        line, col = pos
        return offsets[line - 1] + len(lines[line - 1].encode()[:col].decode())

    out = source
    for knob, value in sorted(chosen, key=lambda kv: kv[0].start, reverse=True):
        literal = repr(value)
        if not _is_literal(ast.parse(literal, mode="eval").body):
            raise KnobError(f"knob {knob.name}: value {value!r} has no Python literal")
        out = out[:index(knob.start)] + literal + out[index(knob.end):]
    ast.parse(out, filename)  # a patched file must still parse
    return out


def diff(original: str, patched: str, filename: str = "train_gpt.py") -> str:
    return "".join(difflib.unified_diff(original.splitlines(keepends=True), patched.splitlines(keepends=True),
                                        f"a/{filename}", f"b/{filename}"))


def code_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def list_knobs(path: str) -> str:
    """What `--list-knobs PATH` prints: one line per knob, ambiguous names marked."""
    from collections import Counter
    from pathlib import Path

    source = Path(path).read_text()
    knobs = find_knobs(source, path)
    counts = Counter(k.name for k in knobs)
    width = max((len(k.name) for k in knobs), default=0)
    lines = [f"{len(knobs)} knobs in {path} (set one in a space as params.\"NAME\"; a name marked * occurs more than "
             "once and cannot be swept as is); hyperparameter classes, module constants and constructor keywords "
             "first, other calls' keywords after:"]

    def group(k: Knob) -> int:  # fields and constants, then keywords of constructors (Muon, GPT), then the rest
        return {"field": 0, "assignment": 0}.get(k.kind, 1 if k.name[:1].isupper() else 2)

    for k in sorted(knobs, key=lambda k: (group(k), k.line)):
        mark = "*" if counts[k.name] > 1 else " "
        value = k.value if len(k.value) <= 60 else k.value[:57] + "..."
        lines.append(f"{mark} {k.name:<{width}}  line {k.line:>5}  {k.kind:<10}  {value}")
    return "\n".join(lines)
