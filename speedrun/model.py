"""The GPT of the speedrun record, one readable block per technique.

Input rows are packed, BOS-separated documents. Techniques (each switchable in ModelConfig): bigram hash
embedding, smear gate, value embeddings (per layer or shared tables, mixed by gates or by learned lambdas),
U-net skip connections with residual lambdas,
QK-norm, half-RoPE with YaRN when the window grows, paired-head attention, partial key offset, sparse
attention gates, ReLU^2 MLP, logit softcap, multi-token prediction, tied embedding/lm_head until a step.

Two kernels run the same maths: the portable path (blocked SDPA attention, bf16/fp32 matmuls, lm_head loss in
checkpointed chunks) and the GPU fast path chosen by `set_fast_path` (FlexAttention block masks, FP8 MLP and
lm_head, the whole loss in one compiled graph). Values a sweep may change without changing a shape (softcap
constants, MTP weights, the attention scale) are tensors, so a compiled graph never bakes them in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import flex_windowed_attention, segment_ids, sliding_block_mask, windowed_attention
from .config import ModelConfig
from .dc_attention import dc_correction
from .fp8 import capped_logsumexp, fp8_head_loss, fp8_linear, mtp_from_lse
from .fp8_mlp import DelayedScales, fp8_delayed_mlp
from .mudd import FINAL, LAST_LAYER, AttnInputs, MuddRouting
from .qk_kernels import qk_norm_rope, rope


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def previous_in_document(x: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """x at the previous position (dim 1) where it belongs to the same document, else 0. Written with full-length
    tensors only: compiled, length-T and length-(T-1) loops tripped inductor's mixed-order reduction fusion."""
    T = segment.size(1)
    same = (segment == torch.roll(segment, 1, dims=1)) & (torch.arange(T, device=segment.device) > 0)
    same = same.view(*same.shape, *([1] * (x.dim() - 2)))
    return torch.where(same, torch.roll(x, 1, dims=1), 0.0)


class CastedLinear(nn.Linear):
    """A weight (fp32; lm_head's as model.table_dtype) cast to the activation dtype at use (or both operands to
    FP8 when `fp8` is set); `scale` (a scalar tensor) multiplies the weight first."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        with torch.no_grad():
            if zero_init:
                self.weight.zero_()
            else:
                bound = math.sqrt(3) * 0.5 * in_features ** -0.5
                self.weight.uniform_(-bound, bound)
        self.fp8 = False

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if scale is None else scale * self.weight
        if self.fp8:
            return fp8_linear(x, weight)
        return F.linear(x, weight.type_as(x))


class Rotary(nn.Module):
    """Half-truncated RoPE: a quarter of the pairs rotate, the rest keep frequency 0; YaRN rescales on window growth."""

    def __init__(self, head_dim: int, min_freq: float, attn_scale: float, yarn_slope: float = 0.1):
        super().__init__()
        self.head_dim, self.min_freq, self.base_scale, self.yarn_slope = head_dim, min_freq, attn_scale, yarn_slope
        self.freq = nn.Buffer(torch.zeros(head_dim // 2), persistent=False)
        self.attn_scale = nn.Buffer(torch.zeros(()), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        quarter = self.head_dim // 4
        freq = self.min_freq ** torch.linspace(0, 1, quarter, dtype=torch.float32)
        self.freq.copy_(torch.cat([freq, torch.zeros(quarter)]))
        self.attn_scale.fill_(self.base_scale)

    @torch.no_grad()
    def yarn_extend(self, old_window: int, new_window: int, alpha: float = 1.0, beta: float = 32.0) -> None:
        """Stretch slow frequencies by old/new (those that turn < alpha times in the old window), keep fast ones."""
        if new_window == old_window:
            return
        turns = old_window * self.freq / (2 * math.pi)
        keep = ((turns - alpha) / (beta - alpha)).clamp(0, 1)
        ratio = old_window / new_window
        self.freq.mul_(ratio + keep * (1 - ratio))
        self.attn_scale.mul_(self.yarn_slope * math.log(new_window / old_window) + 1)

    def forward(self, x: torch.Tensor, paired: bool = False) -> torch.Tensor:  # x: (B, T, H, D)
        return rope(x, self.freq, paired)


@dataclass
class LayerContext:
    """Per-forward facts every block needs."""
    segment: torch.Tensor  # (B, T) segment ids
    window: int | torch.Tensor  # tokens (a tensor on the fast path: a new window then needs no new graph)
    rotary: Rotary
    block_masks: dict | None = None  # (long, paired) -> FlexAttention BlockMask; None: the SDPA kernel
    long: bool = False  # the layer's window is the long one


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, paired: bool, key_offset: bool, has_value_embed: bool, xsa: bool = False):
        super().__init__()
        self.cfg, self.paired, self.key_offset = cfg, paired, key_offset
        self.sa_lambdas = nn.Parameter(torch.tensor([0.5, 1.0])) if cfg.use_sa_lambdas else None
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.fused_qk = False  # QK-norm + RoPE as one Triton kernel (set with the fast path)
        if key_offset:
            self.shifted_dims = nn.Buffer(self.unrotated_dims(cfg.head_dim, cfg.key_offset_dims), persistent=False)
        if cfg.qk_head_pairs:  # Muon orthogonalises q and k per pair of heads (2 x head_dim rows each), v whole
            self.qk, self.v = CastedLinear(cfg.dim, 2 * cfg.dim), CastedLinear(cfg.dim, cfg.dim)
            self.qk.weight.muon_split = cfg.n_head
        else:
            self.qkv = CastedLinear(cfg.dim, 3 * cfg.dim)
            self.qkv.weight.muon_split = 3  # orthogonalise q, k and v separately
        # learnable XSA: a per-head strength, 0 at the start (tanh(0): off); with MUDD a per-token one from its gates
        self.xsa_alpha = nn.Parameter(torch.zeros(cfg.n_head)) if xsa and not cfg.mudd else None
        self.proj = CastedLinear(cfg.dim, cfg.dim, zero_init=True)
        self.gate = nn.Parameter(torch.zeros(cfg.n_head, cfg.gate_dims)) if cfg.use_attn_gate and not cfg.mudd else None
        gated = cfg.value_embed_mix == "gate"
        self.ve_gate = nn.Parameter(torch.zeros(cfg.n_head, cfg.gate_dims)) if has_value_embed and gated else None
        if self.ve_gate is not None:
            self.ve_gate.adam_group = "ve_gate"
        # lambda mixing: v <- l0 * v + l1 * ve on every attention layer (l0 * v where a layer has no table)
        self.ve_lambdas = None if gated or not cfg.use_value_embeds else nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, ctx: LayerContext,
                given: AttnInputs | None = None) -> torch.Tensor:
        """given: per-token gates from the MUDD routing, used instead of the layer's own."""
        B, T, _ = x.shape
        H, D, gd = self.n_head, self.head_dim, self.cfg.gate_dims
        given = given or AttnInputs()
        # sa_lambdas[0] scales q, k and v through the weight, as record #89 does: its gradient is then a sum over
        # the weight, not over every q and k element (where, ahead of the norm, it is mostly bf16 rounding noise)
        lam = self.sa_lambdas[0] if self.sa_lambdas is not None else None
        if self.cfg.qk_head_pairs:
            q, k = self.qk(x, lam).view(B, T, 2, H, D).unbind(dim=2)
            v = self.v(x, lam).view(B, T, H, D)
        else:
            q, k, v = self.qkv(x, lam).view(B, T, 3, H, D).unbind(dim=2)
        if self.cfg.use_qk_norm and self.cfg.use_rope:
            q, k = (qk_norm_rope(t, ctx.rotary.freq, self.fused_qk, self.paired) for t in (q, k))
        elif self.cfg.use_qk_norm:
            q, k = norm(q), norm(k)
        elif self.cfg.use_rope:
            q, k = ctx.rotary(q, self.paired), ctx.rotary(k, self.paired)
        if self.key_offset:
            k = self.offset_keys(k, ctx.segment)
        if given.ve_gate is not None and ve is not None:
            v = v + given.ve_gate.unsqueeze(-1) * ve.view(B, T, H, D)
        elif self.ve_lambdas is not None:
            v = self.ve_lambdas[0].type_as(v) * v
            if ve is not None:
                v = v + self.ve_lambdas[1].type_as(v) * ve.view(B, T, H, D)
        elif ve is not None:
            # record #89 reads half its dims from x, half from the value embedding itself
            gate_in = x[..., :gd] if self.cfg.ve_gate_input == "x" else torch.cat([x[..., :gd // 2], ve[..., :gd // 2]], -1)
            ve_gate = 2 * torch.sigmoid(F.linear(gate_in, self.ve_gate.type_as(x)))
            v = v + ve_gate.unsqueeze(-1) * ve.view(B, T, H, D)
        if given.v_extra is not None:
            v = v + given.v_extra.view(B, T, H, D)
        scale = ctx.rotary.attn_scale if self.cfg.use_yarn else self.cfg.attn_scale
        if ctx.block_masks is not None:
            y = self.flex_attention(q, k, v, ctx.block_masks[ctx.long, self.paired], scale)
        elif self.paired:
            y = self.paired_attention(q, k, v, ctx.segment, ctx.window, scale)
        else:
            y = windowed_attention(q, k, v, ctx.segment, ctx.window, scale)
        if given.dc is not None:
            y = y + dc_correction(q, k, v, ctx.segment, *given.dc, self.cfg.dc_window, scale)
        if given.xsa is not None:
            y = self.exclusive(y, v, given.xsa.unsqueeze(-1))
        elif self.xsa_alpha is not None:
            y = self.exclusive(y, v, self.xsa_alpha.view(1, 1, -1, 1))
        if given.gate is not None:
            y = y * given.gate.unsqueeze(-1)
        elif self.gate is not None:
            y = y * torch.sigmoid(F.linear(x[..., :gd], self.gate.type_as(x))).unsqueeze(-1)
        # sa_lambdas[1] through the output weight too (record #89: its gradient is a sum over the weight, not over y)
        return self.proj(y.reshape(B, T, H * D), self.sa_lambdas[1] if self.sa_lambdas is not None else None)

    @staticmethod
    def exclusive(y: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Learnable XSA: per token and head, remove tanh(alpha) of y's component along the token's own value."""
        along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
        return y - torch.tanh(alpha).type_as(y) * along * v

    def offset_keys(self, k: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """The last key_offset_dims of each key's unrotated dims come from the previous token of the document."""
        return torch.where(self.shifted_dims, previous_in_document(k, segment), k)

    @staticmethod
    def unrotated_dims(head_dim: int, n: int) -> torch.Tensor:
        """(head_dim,) bool: the last n dims that RoPE leaves as they are. Rotary turns pairs (j, j + D/2) for
        j < D/4, so [D/4, D/2) and [3D/4, D) never rotate; record #89 (adjacent pairs in D's first half) shifts
        its whole unrotated half, so 64 of 128 dims here are all of those, not the last 64 (half of them turn)."""
        still = [d for d in range(head_dim) if head_dim // 4 <= d < head_dim // 2 or d >= 3 * head_dim // 4]
        chosen = set(still[len(still) - n:])
        return torch.tensor([d in chosen for d in range(head_dim)])

    @staticmethod
    def pair(t: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) -> (B, 2T, H/2, D): heads 2i and 2i+1 of a token side by side along the sequence."""
        B, T, H, D = t.shape
        return t.view(B, T, H // 2, 2, D).transpose(2, 3).reshape(B, 2 * T, H // 2, D)

    @staticmethod
    def unpair(y: torch.Tensor) -> torch.Tensor:
        B, T2, H2, D = y.shape
        return y.view(B, T2 // 2, 2, H2, D).transpose(2, 3).reshape(B, T2 // 2, 2 * H2, D)

    @classmethod
    def paired_attention(cls, q, k, v, segment, window, scale):
        """Heads 2i and 2i+1 are laid side by side along the sequence: each query sees both heads' keys."""
        y = windowed_attention(cls.pair(q), cls.pair(k), cls.pair(v), segment.repeat_interleave(2, dim=1),
                               2 * window, scale)
        return cls.unpair(y)

    def flex_attention(self, q, k, v, block_mask, scale):
        if self.paired:
            return self.unpair(flex_windowed_attention(self.pair(q), self.pair(k), self.pair(v), block_mask, scale))
        return flex_windowed_attention(q, k, v, block_mask, scale)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.dim, cfg.mlp_dim)
        self.fc.weight.is_mlp_in = True
        self.proj = CastedLinear(cfg.mlp_dim, cfg.dim, zero_init=True)
        self.proj.weight.is_mlp_out = True  # NorMuon gives it its own lr multiplier
        delayed = cfg.fp8_mlp_scaling == "delayed"
        self.scales = DelayedScales(cfg.fp8_act_headroom, cfg.fp8_weight_headroom) if delayed else None
        self.fused = cfg.fused_mlp
        self.fp8_delayed = False  # set with the fast path (GPT.set_fast_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_delayed:
            return fp8_delayed_mlp(x, self.fc.weight, self.proj.weight, self.scales, fused=self.fused)
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.long = layer in cfg.long_window_layers
        has_attn = layer not in cfg.no_attn_layers
        has_ve = cfg.use_value_embeds and layer in cfg.value_embed_layers
        self.attn = CausalSelfAttention(
            cfg,
            paired=cfg.use_paired_heads and layer in cfg.paired_head_layers,
            key_offset=cfg.use_key_offset and self.long and cfg.key_offset_dims > 0,
            has_value_embed=has_ve,
            xsa=layer in cfg.xsa_layers,
        ) if has_attn else None
        self.mlp = MLP(cfg)
        if cfg.mudd and layer == cfg.n_layer - 1 and self.attn is not None:
            self.attn.ve_gate = None  # MUDD gates the last layer's value embedding from its own coefficients
        # residual: x <- l0 * x + l1 * x0 (with MUDD, the routing's lambdas and gates instead)
        self.lambdas = None if cfg.mudd else nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, x0, ve, ctx: LayerContext):
        x = self.lambdas[0].type_as(x) * x + self.lambdas[1].type_as(x) * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, ctx)
        return x + self.mlp(norm(x))


class SmearGate(nn.Module):
    """Adds a gated copy of the previous token's embedding (within the same document)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gd = cfg.gate_dims
        self.gate = nn.Parameter(torch.zeros(1, cfg.gate_dims))
        self.gate.adam_group = "smear_gate"
        self.lam = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(x[..., : self.gd], self.gate.type_as(x)))
        return x + self.lam.type_as(x) * g * previous_in_document(x, segment)


class BigramHashEmbedding(nn.Module):
    """An embedding of the hashed (previous token, token) pair. Hash `mul`: (prev * 1000003 + token) % buckets;
    `xor` (record #89): (36313 token ^ 27191 prev) % (buckets - 1), the last bucket for a row's first token.
    With sign rows (the sign trick), each bigram's row is multiplied by a fixed +-1 vector picked by
    (prev ^ token), so bigrams sharing a bucket pull it in different directions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets, self.hash = cfg.bigram_buckets, cfg.bigram_hash
        self.embed = nn.Embedding(cfg.bigram_buckets, cfg.dim)
        nn.init.zeros_(self.embed.weight)
        if cfg.bigram_sign_rows:  # the same table on every rank: a fixed generator, not the run's seed
            g = torch.Generator(device="cpu").manual_seed(8192)
            table = torch.randn(cfg.bigram_sign_rows, cfg.dim, generator=g, device="cpu").sign()
            self.signs = nn.Buffer(table.to(torch.get_default_device()), persistent=False)
        else:
            self.signs = None

    def bucket(self, tokens: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        if self.hash == "mul":
            return (prev * 1_000_003 + tokens) % self.buckets
        mixed = torch.bitwise_xor(36313 * tokens, 27191 * prev) % (self.buckets - 1)
        mixed[:, 0] = self.buckets - 1
        return mixed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prev = F.pad(tokens[:, :-1], (1, 0), value=0)
        out = self.embed(self.bucket(tokens, prev))
        if self.signs is not None:
            idx = torch.bitwise_xor(prev, tokens) % self.signs.size(0)
            idx[:, 0] = 0
            out = out * self.signs[idx].type_as(out)
        return out


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V, dim = cfg.padded_vocab_size, cfg.dim
        public = cfg.init == "public-2508"  # lm_head zero, embeddings N(0, 1) (public_train_gpt.py L672, L666)
        self.lm_head = CastedLinear(dim, V, zero_init=public)
        if not public:
            nn.init.normal_(self.lm_head.weight, std=0.005)
        self.embed = nn.Embedding(V, dim)  # while tied: a copy of lm_head.weight (see share_tied_weights)
        self.tied = cfg.untie_step != -1
        if self.tied:
            self.share_tied_weights()
        elif not public:
            nn.init.normal_(self.embed.weight, std=0.5)
        self.bigram = BigramHashEmbedding(cfg) if cfg.use_bigram_embed else None
        self.smear = SmearGate(cfg) if cfg.use_smear_gate else None
        ve_layers = [i for i in range(cfg.n_layer)
                     if cfg.use_value_embeds and i in cfg.value_embed_layers and i not in cfg.no_attn_layers]
        tables = cfg.value_embed_tables or len(ve_layers)  # shared tables: the j-th such layer reads table j % k
        self.ve_bank = {layer: j % tables for j, layer in enumerate(ve_layers)}
        self.value_embeds = nn.ModuleList(nn.Embedding(V, dim) for _ in range(min(tables, len(ve_layers))))
        for e in self.value_embeds:
            if not public:
                nn.init.normal_(e.weight, std=0.01)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.n_skip = cfg.n_layer // 2 if cfg.use_skip_connections else 0
        self.skip_weights = nn.Parameter(torch.ones(self.n_skip)) if self.n_skip else None
        self.mudd = MuddRouting(cfg) if cfg.mudd else None
        # each token's prefix token (speedrun.prefix), filled by the trainer; -1: none. None: no prefix-token loss
        self.prefix_table = nn.Buffer(torch.full((V,), -1), persistent=False) if cfg.prefix_vocab else None
        self.rotary = Rotary(cfg.head_dim, cfg.rope_min_freq, cfg.attn_scale, cfg.yarn_attn_slope)
        softcap = (cfg.softcap_scale, cfg.softcap_shift, cfg.softcap_div)
        self.softcap = nn.Buffer(torch.tensor(softcap, dtype=torch.float32), persistent=False)
        self.flex = False
        for table in self.vocab_tables():
            table.data = table.data.to(getattr(torch, cfg.table_dtype))

    def vocab_tables(self) -> list[nn.Parameter]:
        """The vocabulary-sized tables, stored in cfg.table_dtype."""
        return [self.lm_head.weight] + [m.weight for m in self.embeddings()]

    def embeddings(self) -> list[nn.Embedding]:
        return [self.embed, *self.value_embeds] + ([self.bigram.embed] if self.bigram is not None else [])

    def set_fast_path(self, flex: bool, fp8: bool) -> None:
        """flex: FlexAttention (only worth it under torch.compile on a GPU), and with it the fused QK-norm + RoPE
        kernel (fused_qk_norm); fp8: FP8 lm_head, and MLP (fp8_mlp)."""
        self.flex = flex
        self.lm_head.fp8 = fp8
        mlp_fp8 = fp8 and self.cfg.fp8_mlp
        for attn in [b.attn for b in self.blocks if b.attn is not None]:
            attn.fused_qk = flex and self.cfg.fused_qk_norm
        for mlp in [b.mlp for b in self.blocks]:
            mlp.fp8_delayed = mlp_fp8 and mlp.scales is not None
            mlp.fc.fp8 = mlp.proj.fp8 = mlp_fp8 and mlp.scales is None

    def delayed_fp8_scales(self) -> list[DelayedScales]:
        return [b.mlp.scales for b in self.blocks if b.mlp.scales is not None]

    # Tying is kept out of the forward graph, so tied and untied steps run one compiled graph: while tied, the
    # input embedding reads a copy of lm_head.weight, and its gradient is added to lm_head's after backward.
    @torch.no_grad()
    def share_tied_weights(self) -> None:
        """While tied: refresh the embedding's copy of lm_head.weight (after every optimiser step)."""
        if self.tied:
            self.embed.weight.copy_(self.lm_head.weight)

    @torch.no_grad()
    def fold_tied_grad(self) -> None:
        """While tied: the embedding's gradient belongs to lm_head.weight (the shared weight); move it there."""
        g = self.embed.weight.grad
        if self.tied and g is not None:
            if self.lm_head.weight.grad is None:
                self.lm_head.weight.grad = g.to(self.lm_head.weight.dtype)
            else:
                self.lm_head.weight.grad.add_(g)
            self.embed.weight.grad = None

    @torch.no_grad()
    def untie(self) -> None:
        """From here on the input embedding is its own parameter, starting from the shared weights."""
        self.share_tied_weights()
        self.tied = False

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed.weight)

    def block_masks(self, segment: torch.Tensor, windows) -> dict:
        """One BlockMask per (long window, paired) combination that some layer uses."""
        cfg, masks = self.cfg, {}
        for block in self.blocks:
            if block.attn is not None and (block.long, block.attn.paired) not in masks:
                w = windows[1] if block.long else windows[0]
                masks[block.long, block.attn.paired] = sliding_block_mask(segment, w, block.attn.paired, cfg.block_size)
        return masks

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor | tuple[float, ...],
                windows: tuple[int, int] | torch.Tensor, max_seq_len: int, bos_id: int,
                dtype: torch.dtype = torch.float32, prefix_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of next-k-token losses (k = 1..len(mtp_weights)), plus prefix_weight times the loss of
        predicting the next token's prefix token where the model has a prefix table. windows: (short, long) in
        tokens; on the FlexAttention path it may be a tensor of the two, so that their growth compiles no graph."""
        segment = segment_ids(tokens, bos_id, max_seq_len)
        masks = self.block_masks(segment, windows) if self.flex else None
        x = self.embed_tokens(tokens)
        bigram = self.bigram(tokens).to(dtype) if self.bigram is not None else None
        if bigram is not None and self.mudd is None:
            x = x + bigram  # with MUDD it is injected into every layer's stream instead, through gates
        x = x.to(dtype)
        if self.smear is not None:
            x = self.smear(x, segment)
        x0 = norm(x)
        ctxs = [LayerContext(segment, windows[1] if b.long else windows[0], self.rotary, masks, b.long)
                for b in self.blocks]
        if self.mudd is not None:
            x = self.forward_mudd(x0, bigram, tokens, ctxs, dtype)
        else:
            x = self.forward_unet(x0, tokens, ctxs, dtype)
        prefix = None
        if prefix_weight is not None and self.prefix_table is not None:
            prefix_targets = torch.where(targets >= 0, self.prefix_table[targets.clamp_min(0)], -1)
            prefix = (prefix_targets, torch.as_tensor(prefix_weight, dtype=torch.float32, device=x.device))
        return self.head_loss(norm(x), targets, mtp_weights, prefix)

    def value_embed(self, layer: int, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        bank = self.ve_bank.get(layer)
        return self.value_embeds[bank](tokens).to(dtype) if bank is not None else None

    def forward_unet(self, x0: torch.Tensor, tokens: torch.Tensor, ctxs: list[LayerContext], dtype) -> torch.Tensor:
        """The blocks with U-net skips: the first half's outputs are added back, weighted, in reverse order."""
        cfg, x, skips = self.cfg, x0, []
        for i, block in enumerate(self.blocks):
            if self.n_skip and i >= cfg.n_layer - self.n_skip:
                x = x + self.skip_weights[cfg.n_layer - 1 - i].type_as(x) * skips.pop()
            x = block(x, x0, self.value_embed(i, tokens, dtype), ctxs[i])
            if i < self.n_skip:
                skips.append(x)
        return x

    def forward_mudd(self, x0: torch.Tensor, bigram: torch.Tensor | None, tokens: torch.Tensor,
                     ctxs: list[LayerContext], dtype) -> torch.Tensor:
        """The blocks with record #89's MUDD routing (speedrun.mudd): per-token gates from x0 and from the stream
        entering mudd_gate_layer; snapshots `first` (layer 0's input), `skip` and `from`; the last layer mixed
        by its own coefficients; after it, the snapshots added back."""
        cfg, m, last = self.cfg, self.mudd, self.cfg.n_layer - 1
        gates: dict[str, dict[int, torch.Tensor]] = {}
        m.gates(x0, False, gates)
        x = x0 if bigram is None else x0 + gates["bigram"][0] * bigram
        snaps = {"first": x}
        first_ve_layer, first_ve = min(self.ve_bank, default=None), None
        for i, block in enumerate(self.blocks):
            if i == cfg.mudd_gate_layer:
                m.gates(x, True, gates)
            ve = self.value_embed(i, tokens, dtype)
            if i == first_ve_layer:
                first_ve = ve  # added back after the loop: looked up once
            if i == last:
                x = self.mudd_last_layer(block, x, bigram, ve, ctxs[i], snaps, gates)
                continue
            (ra, rm), (pa, pm) = m.resid_lambdas[i].type_as(x).unbind(), m.post_lambdas[i].type_as(x).unbind()
            if block.attn is None:  # the attention-free layer: the gated skip instead
                x = x + torch.sigmoid(m.skip_lambda).type_as(x) * gates["skip"][i] * snaps["skip"]
            else:
                y = block.attn(norm(snaps.get("from", x)), ve, ctxs[i], m.attn_inputs(gates, i))
                x = ra * x + pa * y + gates["x0"][i] * x0
                if bigram is not None and i > 0:
                    x = x + gates["bigram"][i] * bigram
            x = rm * x + pm * block.mlp(norm(x))
            if i == cfg.mudd_skip_from:
                snaps["skip"] = x
            if i == cfg.mudd_attn_from:
                snaps["from"] = x
        c = dict(zip(FINAL, m.final(x).split(1, dim=-1)))
        x = x + c["first"] * snaps["first"] + c["from"] * snaps["from"] + c["last_input"] * snaps["last_input"]
        x = x + c["skip"] * snaps["skip"]
        return x if first_ve is None else x + c["value_embed"] * first_ve

    def mudd_last_layer(self, block, x, bigram, ve, ctx, snaps, gates) -> torch.Tensor:
        """The last layer: 14 per-token coefficients mix the `first` and `from` snapshots into its stream and
        its values, gate its value embedding (two lanes, one per half of the heads) and set its lambdas."""
        m, H = self.mudd, self.cfg.n_head
        first, src = snaps["first"], snaps["from"]
        attn_in = norm(src)
        snaps["last_input"] = x
        mu = dict(zip(LAST_LAYER, m.last_layer(x).split(1, dim=-1)))
        given = m.attn_inputs(gates, self.cfg.n_layer - 1)
        given.v_extra = mu["v_first"] * first + mu["v_from"] * src + mu["v_self"] * x
        given.ve_gate = torch.cat([mu["ve_lane0"], mu["ve_lane1"]], dim=-1).repeat_interleave(H // 2, dim=-1)
        x = (1 + mu["res_self"]) * x + mu["res_first"] * first + mu["res_from"] * src
        y = block.attn(attn_in, ve, ctx, given)
        x = mu["resid_attn"] * x + mu["post_attn"] * y + mu["x0"] * first
        if bigram is not None:
            x = x + mu["bigram"] * bigram
        return mu["resid_mlp"] * x + mu["post_mlp"] * block.mlp(norm(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        z = self.lm_head(x).float()
        if cfg.use_softcap:
            scale, shift, div = self.softcap.unbind()
            z = scale * torch.sigmoid((z + shift) / div)
        return z

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | tuple[float, ...],
                  prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """mtp_loss(self.logits(x), ...) computed in token chunks, recomputing logits in backward:
        full-vocabulary fp32 logits of a long row would otherwise dominate memory. Under torch.compile the
        loss is one graph instead: the compiler keeps only the bf16 logits, and no recomputation is paid."""
        weights = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
        T, chunk = x.size(1), self.cfg.loss_chunk_tokens
        if torch.compiler.is_compiling() and self.lm_head.fp8 and self.cfg.use_softcap:
            return fp8_head_loss(x, self.lm_head.weight, targets, weights, self.softcap, prefix=prefix)
        if T <= chunk or torch.compiler.is_compiling():
            return mtp_loss(self.logits(x), targets, weights, capped=self.cfg.use_softcap, prefix=prefix)
        total = x.new_zeros((), dtype=torch.float32)
        for a in range(0, T, chunk):
            part = partial(self._chunk_loss, targets=targets, weights=weights, start=a, prefix=prefix)
            if torch.is_grad_enabled():
                total = total + checkpoint(part, x[:, a : a + chunk], use_reentrant=False)
            else:
                total = total + part(x[:, a : a + chunk])
        return total

    def _chunk_loss(self, xs, targets, weights, start, prefix=None):
        B, T = targets.shape
        logits = self.logits(xs)
        lse = logits.logsumexp(dim=-1)
        loss = logits.new_zeros(())
        if prefix is not None:
            part = prefix[0][:, start : start + xs.size(1)]
            loss = loss + prefix_loss(logits, lse, (part, prefix[1])) * part.numel() / (B * T)
        for k in range(weights.numel()):
            end = min(start + xs.size(1), T - k)
            if end <= start:
                continue
            n = end - start
            tk = targets[:, start + k : end + k]
            picked = pick(logits[:, :n], tk)
            loss = loss + weights[k] * torch.where(tk >= 0, lse[:, :n] - picked, 0.0).sum() / (B * (T - k))
        return loss


def pick(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits[b, t, targets[b, t]]; a target of -1 (none) picks column 0, which callers mask out (eager; compiled
    code uses mtp_from_lse's masked sums, whose backward is elementwise where a gather's scatters into a full-size
    zero tensor)."""
    return logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def mtp_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | tuple[float, ...],
             capped: bool = False, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k w_k * CE(predict token t+1+k from position t); the log-sum-exp is shared by every k.
    capped: the logits are softcapped (bounded), which allows a one-pass log-sum-exp when compiled.
    prefix: (prefix targets, -1 where none; weight): adds the weight times the prefix-token loss."""
    T = targets.size(1)
    weights = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
    if torch.compiler.is_compiling():
        lse = capped_logsumexp(logits) if capped else logits.logsumexp(dim=-1)
        extra = prefix_loss(logits, lse, prefix) if prefix is not None else 0.0
        return mtp_from_lse(logits, lse, targets, weights) + extra
    lse = logits.logsumexp(dim=-1)
    total = logits.new_zeros(()) if prefix is None else prefix_loss(logits, lse, prefix)
    for k in range(min(weights.numel(), T)):
        tk = targets[:, k:]
        picked = pick(logits[:, : T - k], tk)
        total = total + weights[k] * torch.where(tk >= 0, lse[:, : T - k] - picked, 0.0).mean()
    return total


def prefix_loss(logits: torch.Tensor, lse: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """weight * mean over positions of CE(the next token's prefix token), 0 where it has none (record #89)."""
    targets, weight = prefix
    valid = targets >= 0
    if torch.compiler.is_compiling():  # masked sums, as mtp_from_lse picks
        vocab = torch.arange(logits.size(-1), device=logits.device)
        picked = torch.where(vocab == targets.unsqueeze(-1), logits, 0.0).sum(-1)
    else:
        picked = pick(logits, targets)
    return weight * torch.where(valid, lse - picked, 0.0).mean()
