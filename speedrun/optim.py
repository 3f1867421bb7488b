"""The record's optimisers: NorMuon (Polar Express orthogonalisation) for block matrices, Adam for the rest;
plain Muon with the quintic Newton-Schulz iteration of the public trainer of August 2025 as switches.

Both use cautious weight decay (only entries where the update and the parameter agree in sign decay), with
the decay scaled by the scheduled learning rate. Adam steps once every `adam_every` steps on the gradient
accumulated since its last step. Gradients must already be averaged across ranks when `step` is called.

The updates are pure functions over lists of tensors: NorMuon runs once per bucket of same-shaped matrices
(stacked, one batched Polar Express), Adam once per group. Every hyperparameter (learning rates, decay,
momentum, betas, eps, multipliers) reaches them as a tensor that is refilled each step, so with
`compile=True` (the GPU fast path) each function compiles once per bucket and no knob or schedule value
ever causes a recompilation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import OptimConfig
from .data import to_device

# Polar Express coefficients (Amsel, Persson, Musco, Gower 2025), five degree-5 iterations; numbers as published.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in g (..., m, n)."""
    x = g.bfloat16() if g.is_cuda else g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.mT if transposed else x


# Muon's quintic Newton-Schulz coefficients (Keller Jordan 2024), the same at every iteration.
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's orthogonalisation: `steps` quintic iterations on each matrix of g (..., m), scaled to norm 1."""
    x = g.bfloat16() if g.is_cuda else g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = QUINTIC_COEFFS
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.mT if transposed else x


ORTHOGONALISERS = {"polar_express": polar_express, "quintic": newton_schulz}


@torch.no_grad()
def cautious_decay_(param: torch.Tensor, update: torch.Tensor, decay: float | torch.Tensor) -> None:
    """param -= decay * param where sign(update) == sign(param) (the step already moves it towards 0)."""
    if isinstance(decay, (int, float)) and decay == 0:
        return
    mask = (update * param) > 0
    param.sub_(decay * param * mask)


def _decay_and_step_(p: torch.Tensor, update: torch.Tensor, step_size: torch.Tensor, decay: torch.Tensor,
                     cautious: bool) -> None:
    if cautious:
        cautious_decay_(p, update, decay)
    else:
        p.mul_(1 - decay)
    p.sub_(update * step_size)


def second_axis(rows: int, cols: int, axis: str) -> bool:
    """Whether NorMuon keeps its statistic per column (a wide matrix under axis "larger") rather than per row."""
    return axis == "larger" and rows < cols


@torch.no_grad()
def normuon_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                   second_moments: list[torch.Tensor], hp: torch.Tensor, split: int, steps: int,
                   cautious: bool, normalise: bool = True, ns: str = "polar_express", axis: str = "rows") -> None:
    """One NorMuon step (plain Muon without `normalise`) for same-shaped matrices. hp: (step size, decay, momentum,
    beta2) as a tensor; ns: the orthogonaliser (ORTHOGONALISERS); axis: NorMuon's statistic per output row
    ("rows") or along the longer side ("larger": per column of a wide matrix, as record #89 does)."""
    step_size, decay, momentum, beta2 = hp.unbind()
    n, (out, cols) = len(params), params[0].shape
    rows = out // split
    g = torch.stack(grads)
    buf = torch.stack(bufs).lerp(g, 1 - momentum)
    nesterov = g.lerp(buf, momentum)
    ortho = ORTHOGONALISERS[ns](nesterov.view(n * split, rows, cols), steps).float().view(n, split, rows, cols)
    v = torch.stack(second_moments)
    if normalise:  # NorMuon: normalise each output neuron by a running RMS, then restore each matrix's norm
        v = v.lerp(ortho.square().mean(dim=-2 if second_axis(rows, cols, axis) else -1, keepdim=True), 1 - beta2)
        normed = ortho * v.clamp_min(1e-10).rsqrt()
        l2 = lambda t: t.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()  # noqa: E731  (each matrix's norm)
        ortho = normed * (l2(ortho) / l2(normed).clamp_min(1e-10))
    update = ortho.view(n, out, cols)
    for i, p in enumerate(params):
        bufs[i].copy_(buf[i])
        second_moments[i].copy_(v[i])
        _decay_and_step_(p, update[i].to(p.dtype), step_size, decay, cautious)


@torch.no_grad()
def adam_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], counts: list[torch.Tensor], hp: torch.Tensor, cautious: bool) -> None:
    """One Adam step of every Adam parameter. hp: (n, 7), each parameter's (lr, decay, beta1, beta2, eps, gradient
    scale, active): one compiled graph for all groups (a graph per group recompiled the function once per group).
    The list is always every Adam parameter, so that it never changes shape: one without a gradient this step (the
    embedding while tied to lm_head) has active = 0, which leaves it and its state exactly as they were, whatever
    finite tensor stands in for its gradient."""
    for p, g, m, v, t, row in zip(params, grads, exp_avgs, exp_avg_sqs, counts, hp.unbind(0)):
        lr, decay, b1, b2, eps, grad_scale, active = row.unbind()
        t.add_(active)
        g = g.float() * grad_scale  # a bf16 table's gradient (model.table_dtype), into fp32 moments
        m.lerp_(g, (1 - b1) * active)
        v.lerp_(g.square(), (1 - b2) * active)
        tc = t.clamp_min(1)  # a never-active parameter's moments are 0: its (masked) update stays finite
        update = (m / (1 - b1 ** tc)) / ((v / (1 - b2 ** tc)).sqrt() + eps)
        _decay_and_step_(p, update, lr * active, decay * active, cautious)


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    kind: str  # "muon" | "adam"
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    per_param_lr_mult: list[float] = field(default_factory=list)


def build_groups(model: nn.Module, cfg: OptimConfig) -> list[ParamGroup]:
    """Sort every trainable parameter into exactly one group by its role in the model."""
    muon, muon_mults, head, embed, value, scalars = [], [], [], [], [], []
    tagged: dict[str, list[nn.Parameter]] = {}  # parameters that name their group (p.adam_group: MUDD's, gates)
    for name, p in model.named_parameters():
        matrix = name.startswith("blocks.") and p.ndim == 2
        if hasattr(p, "adam_group"):
            tagged.setdefault(p.adam_group, []).append(p)
        elif matrix and ("qkv" in name or ".qk." in name or ".attn.v." in name or ".proj." in name or ".fc." in name or
                       (cfg.attn_gate_on_muon and name.endswith(".attn.gate"))):
            muon.append(p)
            muon_mults.append(cfg.muon_mlp_out_lr_mult if getattr(p, "is_mlp_out", False) else
                              cfg.muon_mlp_in_lr_mult if getattr(p, "is_mlp_in", False) else 1.0)
        elif name == "lm_head.weight":
            head.append(p)
        elif name == "embed.weight":
            embed.append(p)
        elif name.startswith(("value_embeds.", "bigram.")):
            value.append(p)
        else:
            scalars.append(p)
    groups = [
        ParamGroup("muon", muon, "muon", per_param_lr_mult=muon_mults),
        ParamGroup("head", head, "adam", cfg.head_lr_mult, cfg.embed_wd_mult, tuple(cfg.embed_betas)),
        ParamGroup("embed", embed, "adam", cfg.embed_lr_mult, cfg.embed_wd_mult, tuple(cfg.embed_betas)),
        ParamGroup("value_embed", value, "adam", cfg.value_embed_lr_mult, cfg.value_embed_wd_mult,
                   tuple(cfg.value_embed_betas)),
        ParamGroup("scalar", scalars, "adam", cfg.scalar_lr_mult, cfg.scalar_wd_mult, tuple(cfg.scalar_betas)),
    ]
    mudd = (tuple(cfg.mudd_betas), tuple(cfg.lambda_betas))
    for name, lr_mult, wd_mult, betas in (("mudd", cfg.mudd_lr_mult, 1.0, mudd[0]),
                                          ("mudd_bias", cfg.mudd_lr_mult, 0.0, mudd[0]),
                                          ("mudd_gate", cfg.mudd_gate_lr_mult, 1.0, mudd[0]),
                                          ("mudd_gate_bias", cfg.mudd_gate_lr_mult, 0.0, mudd[0]),
                                          ("resid_lambda", cfg.resid_lambda_lr_mult, 0.0, mudd[1]),
                                          ("post_lambda", cfg.post_lambda_lr_mult, 0.0, mudd[1]),
                                          ("ve_gate", cfg.ve_gate_lr_mult, cfg.ve_gate_wd_mult, cfg.scalar_betas),
                                          ("smear_gate", cfg.smear_gate_lr_mult, 0.0, cfg.scalar_betas)):
        groups.append(ParamGroup(name, tagged.pop(name, []), "adam", lr_mult, wd_mult, betas))
    if tagged:
        raise ValueError(f"parameters tagged for unknown optimiser groups: {sorted(tagged)}")
    return [g for g in groups if g.params]


class SpeedrunOptimizer:
    """NorMuon + Adam groups; `step(step, lr_mult, momentum)` applies one training step's update."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, compile: bool | object = False):
        """compile: True (inductor) or a torch.compile backend (tests count compilations with one)."""
        self.cfg = cfg
        self.groups = build_groups(model, cfg)
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self.adam_steps = 0
        self.muon_buckets = self._bucket_muon()
        backend = "inductor" if compile is True else compile
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False, backend=backend)) if compile else (lambda f: f)
        self._normuon, self._adam = wrap(normuon_update), wrap(adam_update)

    def _bucket_muon(self) -> list[tuple[list[nn.Parameter], float]]:
        """Muon matrices grouped by (shape, split, lr multiplier); each bucket's step-size factor."""
        buckets = defaultdict(list)
        for g in self.groups:
            if g.kind == "muon":
                for p, mult in zip(g.params, g.per_param_lr_mult):
                    split = getattr(p, "muon_split", 1)
                    rows, cols = p.size(0) // split, p.size(1)
                    buckets[tuple(p.shape), split, mult * max(1.0, rows / cols) ** 0.5].append(p)
        return [(params, factor) for (_, _, factor), params in buckets.items()]

    # ---- what the training loop needs --------------------------------------------------------
    def muon_params(self) -> list[nn.Parameter]:
        return [p for g in self.groups if g.kind == "muon" for p in g.params]

    def adam_params(self) -> list[nn.Parameter]:
        return [p for g in self.groups if g.kind == "adam" for p in g.params]

    def adam_due(self, step: int, last_step: int) -> bool:
        return (step + 1) % self.cfg.adam_every == 0 or step == last_step

    def zero_grad(self, adam_too: bool) -> None:
        for g in self.groups:
            if g.kind == "muon" or adam_too:
                for p in g.params:
                    p.grad = None

    @torch.no_grad()
    def step(self, lr_mult: float, momentum: float, adam: bool, adam_grad_scale: float = 1.0) -> None:
        c = self.cfg
        adam_groups = [g for g in self.groups if g.kind == "adam"] if adam else []
        # every scalar of this step in one host-to-device copy
        rows = [[c.muon_lr * lr_mult * factor, c.muon_lr * lr_mult * c.muon_wd, momentum, c.muon_beta2, 0, 0, 0]
                for _, factor in self.muon_buckets]
        adam_params = []  # every Adam parameter, each with its group's row (see adam_update: `active`)
        for g in adam_groups:
            lr = c.adam_lr * g.lr_mult * lr_mult
            row = [lr, lr ** c.adam_wd_power * c.adam_wd * g.wd_mult, g.betas[0], g.betas[1], c.adam_eps, adam_grad_scale]
            for p in g.params:
                adam_params.append(p)
                rows.append(row + [float(p.grad is not None)])
        device = self.groups[0].params[0].device
        hp = to_device(torch.tensor(rows, dtype=torch.float32), device)
        for i, (params, _) in enumerate(self.muon_buckets):
            self._muon_step(params, hp[i, :4])
        if adam_params:
            self._adam_step(adam_params, hp[len(self.muon_buckets):])
        if adam:
            self.adam_steps += 1

    def copy_state(self, src: nn.Parameter, dst: nn.Parameter) -> None:
        """Give dst a copy of src's optimiser state (used when the embedding is untied from lm_head)."""
        if src in self.state:
            self.state[dst] = {k: v.clone() for k, v in self.state[src].items()}

    def state_dict(self) -> dict:
        order = [p for g in self.groups for p in g.params]
        return {"adam_steps": self.adam_steps,
                "state": {i: {k: v.clone() for k, v in self.state[p].items() if k != "zero_grad"}
                          for i, p in enumerate(order) if p in self.state}}

    def load_state_dict(self, sd: dict) -> None:
        order = [p for g in self.groups for p in g.params]
        self.adam_steps = sd["adam_steps"]
        self.state = {order[i]: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()}

    # ---- the two update rules ----------------------------------------------------------------
    def _muon_step(self, params: list[nn.Parameter], hp: torch.Tensor) -> None:
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        for p in params:
            st = self.state.setdefault(p, {})
            if "momentum" not in st:
                split = getattr(p, "muon_split", 1)
                rows, cols = p.size(0) // split, p.size(1)
                shape = (split, 1, cols) if second_axis(rows, cols, self.cfg.normuon_axis) else (split, rows, 1)
                st["momentum"] = torch.zeros_like(p, dtype=torch.float32)
                st["second_moment"] = torch.zeros(shape, device=p.device, dtype=torch.float32)
        self._normuon(params, [p.grad for p in params], [self.state[p]["momentum"] for p in params],
                      [self.state[p]["second_moment"] for p in params], hp,
                      getattr(params[0], "muon_split", 1), self.cfg.polar_express_steps, self.cfg.cautious_wd,
                      self.cfg.muon_variant == "normuon", self.cfg.muon_ns, self.cfg.normuon_axis)

    def _adam_step(self, params: list[nn.Parameter], hp: torch.Tensor) -> None:
        for p in params:
            st = self.state.setdefault(p, {})
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)  # fp32 also for bf16 tables
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["t"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st = [self.state[p] for p in params]
        # a parameter without a gradient is inactive in this step, and zeros stand in for its gradient: a tensor of
        # its own (the parameter itself would alias a mutated input of the compiled graph), kept while needed
        grads = []
        for p, s in zip(params, st):
            if p.grad is None:
                grads.append(s.setdefault("zero_grad", torch.zeros_like(p)))
            else:
                grads.append(p.grad)
                s.pop("zero_grad", None)
        self._adam(params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                   [s["t"] for s in st], hp, self.cfg.cautious_wd)
