"""MUDD connections (multiway dynamic dense, arXiv 2502.12170) as record #89 uses them: the residual stream's
routing, computed per token.

Small MLPs read the residual stream and give per-token coefficients:
- two gate generators, one at the embedding (x0) and one at the input of `mudd_gate_layer`, give each later
  layer's XSA strength, attention-output gate, x0 and bigram injection, the skip into the attention-free layer
  (from the `mudd_skip_from` snapshot) and DC-MHA's weights;
- at the last layer, 14 coefficients mix snapshots (the first layer's input, the `mudd_attn_from` layer's output,
  the stream) into the stream and into the values, gate its value embedding and replace its fixed lambdas;
- after the last layer, 5 coefficients add the snapshots, the last layer's input and the first value embedding
  back (the -0.5 start on the `mudd_attn_from` snapshot backs that layer out before the head).
Layers after `mudd_attn_from` attend over that layer's (normalised) output instead of the stream. Every other
layer's residual has learned lambdas: x <- r_a x + p_a attn + g_x0 x0 + g_bigram bigram, x <- r_m x + p_m mlp.
This replaces the U-net skips and the x0 lambdas of earlier records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# the last layer's 14 coefficients, in order, and their starting values (record #89)
LAST_LAYER = ("v_first", "v_from", "v_self", "res_first", "res_from", "res_self", "ve_lane0", "ve_lane1",
              "resid_attn", "post_attn", "x0", "bigram", "resid_mlp", "post_mlp")
LAST_LAYER_START = (0, 0, 0, 0, 0, 0, 2.0, 2.0, 1.1 ** 0.5, 1.0, 0, 0.05, 1.1 ** 0.5, 1.0)
# after the loop: first layer's input, `from` snapshot (backed out by half), last layer's input, value embed, skip
FINAL = ("first", "from", "last_input", "value_embed", "skip")
FINAL_START = (0, -0.5, 0, 0, 0)
GATE_START = {"xsa": 0.0, "attn": 0.25, "x0": 0.0, "bigram": 0.05, "skip": 0.5, "dc_w1": 1.0, "dc_w2": 0.0}


class TokenCoefficients(nn.Module):
    """n coefficients per token: (gelu(x W1^T) W2^T + b) * scale. W2 starts at zero, so each coefficient starts
    at its `start` value (b holds start / scale). learned_scale: a learned scalar that starts at `scale`."""

    def __init__(self, dim: int, hidden: int, start: list[float], group: str, scale: float = 0.1,
                 learned_scale: nn.Parameter | None = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, dim))
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
        self.w2 = nn.Parameter(torch.zeros(len(start), hidden))
        self.b = nn.Parameter(torch.tensor(start, dtype=torch.float32) / scale)
        self.scale = scale if learned_scale is None else learned_scale
        self.w1.adam_group = self.w2.adam_group = group  # the optimiser's group for it (see speedrun.optim)
        self.b.adam_group = group + "_bias"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.w1.type_as(x)))
        scale = self.scale.type_as(x) if isinstance(self.scale, torch.Tensor) else self.scale
        return (F.linear(h, self.w2.type_as(x)) + self.b.type_as(x)) * scale


@dataclass
class GateSlots:
    """Where each layer's gates sit in one gate generator's output: name -> {layer: slice}."""
    slots: dict[str, dict[int, slice]] = field(default_factory=dict)
    start: list[float] = field(default_factory=list)

    def add(self, name: str, layer: int, width: int) -> None:
        self.slots.setdefault(name, {})[layer] = slice(len(self.start), len(self.start) + width)
        self.start += [GATE_START[name]] * width

    def unpack(self, gate: torch.Tensor, into: dict[str, dict[int, torch.Tensor]]) -> None:
        for name, layers in self.slots.items():
            for layer, s in layers.items():
                into.setdefault(name, {})[layer] = gate[..., s]


def gate_slots(cfg: ModelConfig, layers: list[int]) -> GateSlots:
    """Record #89's layout for the gates of `layers`: XSA strengths, attention gates, (x0, bigram) pairs, the
    skip, then DC-MHA's (w1, w2) per layer."""
    g, H, last = GateSlots(), cfg.n_head, cfg.n_layer - 1
    for i in layers:
        if i in cfg.xsa_layers:
            g.add("xsa", i, H)
    for i in layers:
        if i in cfg.attn_gate_layers:
            g.add("attn", i, H)
    for i in layers:
        if i not in cfg.no_attn_layers and i != last:
            g.add("x0", i, 1)
            g.add("bigram", i, 1)
    for i in layers:
        if i in cfg.no_attn_layers:
            g.add("skip", i, 1)
    for i in layers:
        if i in cfg.dc_layers:
            g.add("dc_w1", i, H)
            g.add("dc_w2", i, H)
    return g


@dataclass
class AttnInputs:
    """Per-token inputs the MUDD routing hands one attention layer; None: the layer's own (or none)."""
    xsa: torch.Tensor | None = None  # (B, T, H) XSA strengths before tanh
    gate: torch.Tensor | None = None  # (B, T, H) output gate, applied as it is
    ve_gate: torch.Tensor | None = None  # (B, T, H) value-embedding gate, applied as it is
    v_extra: torch.Tensor | None = None  # (B, T, H * D) added to the values
    dc: tuple[torch.Tensor, torch.Tensor] | None = None  # DC-MHA's (w1, w2), (B, T, H) each


class MuddRouting(nn.Module):
    """The parameters of the routing: gate generators, the last layer's and the final coefficients, the
    per-layer residual lambdas and the skip's lambda. The model's forward (GPT.forward_mudd) applies them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, dim, hidden = cfg.n_layer, cfg.dim, cfg.mudd_dim
        self.pre_slots = gate_slots(cfg, list(range(cfg.mudd_gate_layer)))
        self.post_slots = gate_slots(cfg, list(range(cfg.mudd_gate_layer, L)))
        self.gate_scale = nn.Parameter(torch.tensor(0.1))  # learned, one for both gate generators
        self.gate_scale.adam_group = "mudd_gate_bias"
        gate = lambda slots: TokenCoefficients(dim, hidden, slots.start, "mudd_gate", 0.1, self.gate_scale)  # noqa: E731
        self.pre_gate, self.post_gate = gate(self.pre_slots), gate(self.post_slots)
        self.last_layer = TokenCoefficients(dim, hidden, list(LAST_LAYER_START), "mudd")
        self.final = TokenCoefficients(dim, hidden, list(FINAL_START), "mudd")
        # per layer (attention, MLP): sqrt(1.1) each, so the stream grows by 1.1 a layer before its updates
        self.resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1 ** 0.5))
        self.post_lambdas = nn.Parameter(torch.ones(L, 2))
        self.resid_lambdas.adam_group, self.post_lambdas.adam_group = "resid_lambda", "post_lambda"
        self.skip_lambda = nn.Parameter(torch.tensor(-1.5))  # sigmoid(-1.5) ~ 0.18 of the gated skip

    def gates(self, x: torch.Tensor, post: bool, into: dict[str, dict[int, torch.Tensor]]) -> None:
        slots, net = (self.post_slots, self.post_gate) if post else (self.pre_slots, self.pre_gate)
        if slots.start:
            slots.unpack(net(x), into)

    @staticmethod
    def attn_inputs(gates: dict[str, dict[int, torch.Tensor]], layer: int) -> AttnInputs:
        dc = gates.get("dc_w1", {}).get(layer)
        return AttnInputs(xsa=gates.get("xsa", {}).get(layer), gate=gates.get("attn", {}).get(layer),
                          dc=None if dc is None else (dc, gates["dc_w2"][layer]))
