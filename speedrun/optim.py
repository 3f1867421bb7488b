"""The record's optimisers: NorMuon (Polar Express orthogonalisation) for block matrices, Adam for the rest.

Both use cautious weight decay (only entries where the update and the parameter agree in sign decay), with
the decay scaled by the scheduled learning rate. Adam steps once every `adam_every` steps on the gradient
accumulated since its last step. Gradients must already be averaged across ranks when `step` is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import OptimConfig

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


@torch.no_grad()
def cautious_decay_(param: torch.Tensor, update: torch.Tensor, decay: float) -> None:
    """param -= decay * param where sign(update) == sign(param) (the step already moves it towards 0)."""
    if decay == 0:
        return
    mask = (update * param) > 0
    param.sub_(decay * param * mask)


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
    muon, mlp_out, embed, value, scalars = [], [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.ndim == 2 and ("qkv" in name or ".proj." in name or ".fc." in name):
            (mlp_out if getattr(p, "is_mlp_out", False) else muon).append(p)
        elif name in ("lm_head.weight", "embed.weight"):
            embed.append(p)
        elif name.startswith(("value_embeds.", "bigram.")):
            value.append(p)
        else:
            scalars.append(p)
    groups = [
        ParamGroup("muon", muon + mlp_out, "muon",
                   per_param_lr_mult=[1.0] * len(muon) + [cfg.muon_mlp_out_lr_mult] * len(mlp_out)),
        ParamGroup("embed", embed, "adam", cfg.embed_lr_mult, cfg.embed_wd_mult, tuple(cfg.embed_betas)),
        ParamGroup("value_embed", value, "adam", cfg.value_embed_lr_mult, cfg.value_embed_wd_mult,
                   tuple(cfg.value_embed_betas)),
        ParamGroup("scalar", scalars, "adam", cfg.scalar_lr_mult, cfg.scalar_wd_mult, tuple(cfg.scalar_betas)),
    ]
    return [g for g in groups if g.params]


class SpeedrunOptimizer:
    """NorMuon + Adam groups; `step(step, lr_mult, momentum)` applies one training step's update."""

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        self.cfg = cfg
        self.groups = build_groups(model, cfg)
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self.adam_steps = 0

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
        for g in self.groups:
            if g.kind == "muon":
                self._muon_step(g, lr_mult, momentum)
            elif adam:
                self._adam_step(g, lr_mult, adam_grad_scale)
        if adam:
            self.adam_steps += 1

    def copy_state(self, src: nn.Parameter, dst: nn.Parameter) -> None:
        """Give dst a copy of src's optimiser state (used when the embedding is untied from lm_head)."""
        if src in self.state:
            self.state[dst] = {k: v.clone() for k, v in self.state[src].items()}

    def state_dict(self) -> dict:
        order = [p for g in self.groups for p in g.params]
        return {"adam_steps": self.adam_steps,
                "state": {i: {k: v.clone() for k, v in self.state[p].items()}
                          for i, p in enumerate(order) if p in self.state}}

    def load_state_dict(self, sd: dict) -> None:
        order = [p for g in self.groups for p in g.params]
        self.adam_steps = sd["adam_steps"]
        self.state = {order[i]: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()}

    # ---- the two update rules ----------------------------------------------------------------
    def _muon_step(self, g: ParamGroup, lr_mult: float, momentum: float) -> None:
        c = self.cfg
        lr = c.muon_lr * lr_mult
        for p, mult in zip(g.params, g.per_param_lr_mult):
            if p.grad is None:
                continue
            st = self.state.setdefault(p, {})
            split = getattr(p, "muon_split", 1)
            rows, cols = p.size(0) // split, p.size(1)
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p)
                st["second_moment"] = torch.zeros(split, rows, 1, device=p.device, dtype=torch.float32)
            buf = st["momentum"]
            buf.lerp_(p.grad, 1 - momentum)
            nesterov = p.grad.lerp(buf, momentum)
            ortho = polar_express(nesterov.view(split, rows, cols), c.polar_express_steps).float()
            # NorMuon: normalise each output neuron by a running RMS, then restore the overall norm.
            v = st["second_moment"]
            v.lerp_(ortho.square().mean(dim=-1, keepdim=True), 1 - c.muon_beta2)
            normed = ortho * v.clamp_min(1e-10).rsqrt()
            normed = normed * (ortho.norm() / normed.norm().clamp_min(1e-10))
            update = normed.view_as(p).to(p.dtype)
            if c.cautious_wd:
                cautious_decay_(p, update, lr * c.muon_wd)
            else:
                p.mul_(1 - lr * c.muon_wd)
            p.add_(update, alpha=-lr * mult * max(1.0, rows / cols) ** 0.5)

    def _adam_step(self, g: ParamGroup, lr_mult: float, grad_scale: float) -> None:
        c = self.cfg
        lr = c.adam_lr * g.lr_mult * lr_mult
        wd = c.adam_wd * g.wd_mult
        b1, b2 = g.betas
        for p in g.params:
            if p.grad is None:
                continue
            st = self.state.setdefault(p, {})
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
                st["t"] = torch.zeros((), dtype=torch.float32)
            st["t"] += 1
            t = st["t"].item()
            grad = p.grad * grad_scale
            st["exp_avg"].lerp_(grad, 1 - b1)
            st["exp_avg_sq"].lerp_(grad.square(), 1 - b2)
            m_hat = st["exp_avg"] / (1 - b1 ** t)
            v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
            update = m_hat / (v_hat.sqrt() + c.adam_eps)
            if c.cautious_wd:
                cautious_decay_(p, update, lr * wd)
            else:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)
