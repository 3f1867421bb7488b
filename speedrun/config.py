"""TrainConfig: every knob of the trainer, typed, with the `record` and `tiny` presets.

Configs are immutable nested dataclasses. `cfg.override({"optim.muon_lr": 0.03})` returns a new, validated
config; tuple-valued knobs can be set whole (`schedule.long_windows=[3,7,11,13]`) or by index
(`schedule.long_windows.2=12`). `to_dict()` gives flat dotted keys for logging and `from_dict()` reads
them back.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_origin, get_type_hints

SECTIONS = ("model", "optim", "schedule", "data", "run")
SAMPLE_BOS_ID = 127  # speedrun.sample.SampleSpec().bos_id (kept here so config imports nothing heavy)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    n_layer: int = 11
    n_head: int = 6
    head_dim: int = 128
    dim: int = 768
    mlp_dim: int = 3072
    block_size: int = 128  # tokens per attention-window unit
    no_attn_layers: tuple[int, ...] = (6,)
    long_window_layers: tuple[int, ...] = (3, 10)
    value_embed_layers: tuple[int, ...] = (1, 2, 8, 9, 10)
    value_embed_tables: int = 0  # 0: one table per value-embed layer; k: k tables, layer j of them uses table j % k
    value_embed_mix: str = "gate"  # gate: v + 2σ(gate·x)·ve | lambda: l0·v + l1·ve with learned (l0, l1) per layer
    paired_head_layers: tuple[int, ...] = (0, 2, 5, 9)
    use_value_embeds: bool = True
    use_smear_gate: bool = True
    use_bigram_embed: bool = True
    bigram_buckets: int = 65536
    bigram_hash: str = "mul"  # mul: (prev * 1000003 + tok) % buckets | xor: record #89's (36313 tok ^ 27191 prev)
    bigram_sign_rows: int = 0  # > 0: the sign trick, each bigram's row times a +-1 vector of this many (record: 8192)
    use_skip_connections: bool = True
    use_paired_heads: bool = True
    use_key_offset: bool = True
    key_offset_dims: int = 32  # trailing head dims of the key taken from the previous token
    use_attn_gate: bool = True
    xsa_layers: tuple[int, ...] = ()  # learnable XSA: remove tanh(a_h) of the output's part along the own value
    qk_head_pairs: bool = False  # q and k as one matrix per pair of heads for Muon (record #89), v apart
    use_sa_lambdas: bool = False  # per attention layer: v scaled by l0 (q, k too without QK-norm), the output by l1
    mudd: bool = False  # record #89's MUDD routing (speedrun.mudd) instead of U-net skips and x0 lambdas
    mudd_dim: int = 64  # hidden width of MUDD's per-token coefficient MLPs
    mudd_skip_from: int = 3  # this layer's output reaches the attention-free layer through a gated skip
    mudd_attn_from: int = 7  # later layers attend over this layer's output; a MUDD source, backed out at the end
    mudd_gate_layer: int = 4  # the second gate generator reads the stream entering this layer
    attn_gate_layers: tuple[int, ...] = (3, 10)  # with mudd: attention outputs gated per token by MUDD gates
    dc_layers: tuple[int, ...] = ()  # with mudd: DC-MHA (heads share a composed local pattern) on these layers
    dc_window: int = 112  # DC-MHA's local window in tokens
    prefix_vocab: str = ""  # prefix-token loss's vocabulary: gpt2 (tiktoken) | a .tiktoken file | empty: no such loss
    gate_dims: int = 12  # residual dims read by the sparse gates (attention, value embedding, smear)
    ve_gate_input: str = "x"  # x: the value-embedding gate reads gate_dims dims of x | x_ve: half of x, half of ve
    use_qk_norm: bool = True
    use_rope: bool = True
    rope_min_freq: float = 1 / 1024
    use_yarn: bool = True
    yarn_attn_slope: float = 0.1  # on each window growth the attention scale is multiplied by 1 + slope * ln(new/old)
    attn_scale: float = 0.12
    use_softcap: bool = True
    softcap_scale: float = 23.0
    softcap_shift: float = 5.0
    softcap_div: float = 7.5
    untie_step: int = 847  # embedding and lm_head share weights until this step; -1: never tied
    use_fp8: bool = True  # FP8 lm_head and MLP matmuls on CUDA (torch._scaled_mm); CPU always runs them unquantised
    fp8_mlp: bool = True  # with use_fp8: the MLP's matmuls too (False: the lm_head only)
    # current: each FP8 product, forward and backward, scaled by its operands' own amax | delayed (record #89):
    # FP8 forward only, the down-projection's input and weight under scales from the previous forward's amax
    # times a headroom (speedrun.fp8_mlp), the weight's current scale for the first fp8_bootstrap_steps steps
    fp8_mlp_scaling: str = "current"
    fp8_act_headroom: float = 1.8
    fp8_weight_headroom: float = 1.12
    fp8_bootstrap_steps: int = 16
    fused_mlp: bool = True  # delayed FP8 MLP on FP8 hardware: relu^2 inside its matmuls (speedrun.mlp_kernels)
    fused_qk_norm: bool = True  # FlexAttention path: QK-norm + RoPE in one Triton kernel (speedrun.qk_kernels)
    # storage of the vocabulary-sized tables (embed, value embeddings, bigram embedding, lm_head): float32, or
    # bfloat16 as record #89 keeps them (their gradients bf16 too; Adam's moments stay fp32)
    table_dtype: str = "float32"
    init: str = "record"  # record | public-2508: lm_head zero, embeddings N(0, 1)
    attn_kernel: str = "auto"  # auto: FlexAttention on CUDA when compiled, else SDPA | flex | sdpa
    loss_chunk_tokens: int = 8192  # lm_head + loss in chunks of this many tokens (memory, not maths)


@dataclass(frozen=True)
class OptimConfig:
    muon_lr: float = 0.023
    muon_momentum: float = 0.95
    muon_momentum_min: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_momentum_cooldown_steps: int = 50
    muon_beta2: float = 0.9
    muon_wd: float = 1.2
    muon_mlp_out_lr_mult: float = 2.0
    muon_mlp_in_lr_mult: float = 1.0
    muon_variant: str = "normuon"  # normuon: per-neuron RMS normalisation after orthogonalising | muon: none
    normuon_axis: str = "rows"  # rows: a statistic per output row | larger: per row or column, the longer side
    muon_ns: str = "polar_express"  # polar_express | quintic (Newton-Schulz, fixed coefficients 3.4445, -4.775, 2.0315)
    polar_express_steps: int = 5  # orthogonalisation iterations (either kind)
    attn_gate_on_muon: bool = False  # the attention gates' matrices with Muon (else with the Adam scalars)
    adam_lr: float = 0.008
    adam_eps: float = 1e-10
    adam_wd: float = 0.005
    adam_every: int = 2  # Adam steps once every this many steps, on the accumulated gradient
    adam_wd_power: int = 1  # Adam's decay per step: wd * wd_mult * lr ** power (record #89: lr squared)
    embed_betas: tuple[float, ...] = (0.5, 0.95)
    embed_lr_mult: float = 1.0
    head_lr_mult: float = 1.0  # lm_head's Adam lr multiplier (its betas and decay are the embedding's)
    embed_wd_mult: float = 150.0
    value_embed_betas: tuple[float, ...] = (0.75, 0.95)
    value_embed_lr_mult: float = 75.0
    value_embed_wd_mult: float = 5.0
    scalar_betas: tuple[float, ...] = (0.9, 0.99)
    scalar_lr_mult: float = 5.0
    scalar_wd_mult: float = 0.0
    ve_gate_lr_mult: float = 5.0  # the value-embedding gates (record #89: 1.0, decayed like the matrices of Adam)
    ve_gate_wd_mult: float = 0.0
    smear_gate_lr_mult: float = 5.0  # the smear gate's weights (record #89: 0.01); its lambda is a scalar
    cautious_wd: bool = True
    mudd_lr_mult: float = 0.25  # MUDD's coefficient MLPs (their biases without decay)
    mudd_gate_lr_mult: float = 0.1  # MUDD's gate generators
    mudd_betas: tuple[float, ...] = (0.9, 0.99)
    resid_lambda_lr_mult: float = 5.0  # MUDD's per-layer residual lambdas
    post_lambda_lr_mult: float = 1.0  # MUDD's per-layer update lambdas
    lambda_betas: tuple[float, ...] = (0.9, 0.95)


@dataclass(frozen=True)
class ScheduleConfig:
    num_scheduled_steps: int = 1270
    extension_steps: int = 15
    cooldown_frac: float = 0.60
    final_lr_frac: float = 0.15
    # Stage k runs from stage_starts[k] (the last, extension stage from num_scheduled_steps).
    stage_starts: tuple[int, ...] = (0, 423, 847)
    tokens_per_step: tuple[int, ...] = (131072, 262144, 393216, 393216)
    max_seq_lens: tuple[int, ...] = (896, 2048, 2048, 2048)
    short_windows: tuple[int, ...] = (1, 3, 5, 6)
    long_windows: tuple[int, ...] = (3, 7, 11, 13)
    stage_lr_mults: tuple[float, ...] = (1.0, 1.52, 1.73, 0.15)
    # Multi-token prediction weights, annealed linearly from start to end within each stage.
    mtp_start: tuple[tuple[float, ...], ...] = ((1.0, 0.5, 0.25), (1.0, 0.5), (1.0,), (1.0,))
    mtp_end: tuple[tuple[float, ...], ...] = ((1.0, 0.5, 0.0), (1.0, 0.0), (1.0,), (1.0,))
    final_long_window: int = 20
    # The prefix-token loss's weight per stage, annealed linearly from start to end (with model.prefix_vocab);
    # empty: no such loss.
    prefix_start: tuple[float, ...] = ()
    prefix_end: tuple[float, ...] = ()

    @property
    def total_steps(self) -> int:
        return self.num_scheduled_steps + self.extension_steps

    @property
    def num_stages(self) -> int:
        return len(self.stage_starts) + 1


@dataclass(frozen=True)
class DataConfig:
    source: str = "fineweb"  # "fineweb": .bin shards under data_dir; "sample": the generated corpus
    data_dir: str = ""  # empty: $SPEEDRUN_DATA or ./data/fineweb10B (fineweb), the sample cache (sample)
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    val_tokens: int = 10_485_760
    bos_id: int = 50256
    max_micro_batch_tokens: int = 49152  # per rank per forward; gradient accumulation covers the rest
    # each validation forward is a sequence of its own (its first tokens lose the context before it), so this size
    # moves the loss: 65,536 divides 10,485,760 / 8; a size that does not divide gets a filled-up last forward
    val_micro_batch_tokens: int = 65536


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # activations on GPU; CPU always runs float32
    val_every: int = 250
    log_every: int = 25
    warmup_steps: int = 3  # untimed steps per stage shape before the model and optimiser are reset
    target_loss: float = 3.28
    compile: bool = True  # GPU only: torch.compile of the model (full graph with flex) and the optimiser steps
    threads: int = 0  # CPU threads per process; 0 keeps torch's default
    # compiled runs: processes that compile the later warm-up phases while the trainer compiles the first
    # (speedrun.warmup_helpers); each holds a model and a step's activations on the trainer's device
    warmup_workers: int = 0


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "TrainConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()

    def override(self, updates: dict[str, Any]) -> "TrainConfig":
        """New config with dotted keys replaced; values may be typed or strings (from a CLI)."""
        sections = {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}
        for key, value in updates.items():
            section, name, index = _split_key(key)
            cls = type(getattr(self, section))
            hint = get_type_hints(cls)[name]
            if index is None:
                sections[section][name] = _coerce(key, value, hint)
            else:
                current = list(sections[section][name])
                if not 0 <= index < len(current):
                    raise ValueError(f"{key}: index {index} out of range for {name} of length {len(current)}")
                current[index] = _coerce(key, value, get_args(hint)[0])
                sections[section][name] = _coerce(key, current, hint)
        return _build(sections)

    def to_dict(self) -> dict[str, Any]:
        """Flat dotted keys; tuples become lists (JSON-friendly)."""
        flat = {}
        for s in SECTIONS:
            for f in fields(getattr(self, s)):
                flat[f"{s}.{f.name}"] = _jsonable(getattr(getattr(self, s), f.name))
        return flat

    @staticmethod
    def resolve(preset: str | None = None, sets: dict[str, Any] | None = None, steps: int | None = None,
                base: "TrainConfig | None" = None) -> "TrainConfig":
        """The one order every entry point builds a run's config in (`python -m speedrun`, sweeps, record runs,
        calibration, benchmarks): the preset (or `base`), then the whole schedule compressed to `steps` (None
        or 0: the preset's own), then `sets` exactly as given. A --set value is the value the run gets; it is
        never rescaled by --steps."""
        cfg = base if base is not None else TrainConfig.preset(preset or "tiny")
        if steps:
            cfg = cfg.with_total_steps(steps)
        return cfg.override(sets) if sets else cfg

    @staticmethod
    def from_dict(flat: dict[str, Any]) -> "TrainConfig":
        return TrainConfig().override(flat)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    # ---- derived settings -----------------------------------------------------------------------
    def with_total_steps(self, steps: int) -> "TrainConfig":
        """The same run compressed (or stretched) to `steps` steps: every step-valued knob scales."""
        sch = self.schedule
        if steps < sch.num_stages:
            raise ValueError(f"--steps {steps} is too short: the schedule has {sch.num_stages} stages")
        ratio = steps / sch.total_steps
        scaled = lambda n: max(1, round(n * ratio)) if n > 0 else n  # noqa: E731
        ext = max(1, round(sch.extension_steps * ratio)) if sch.extension_steps else 0
        scheduled = steps - ext
        starts = tuple(sorted({0, *(min(scheduled - 1, scaled(s)) for s in sch.stage_starts[1:])}))
        if len(starts) != len(sch.stage_starts):
            raise ValueError(f"--steps {steps} is too short to keep {sch.num_stages} distinct stages")
        o, r = self.optim, self.run
        return replace(
            self,
            schedule=replace(sch, num_scheduled_steps=scheduled, extension_steps=ext, stage_starts=starts),
            optim=replace(
                o,
                muon_momentum_warmup_steps=scaled(o.muon_momentum_warmup_steps),
                muon_momentum_cooldown_steps=scaled(o.muon_momentum_cooldown_steps),
            ),
            model=replace(self.model, untie_step=scaled(self.model.untie_step)),
            run=replace(r, val_every=scaled(r.val_every), log_every=max(1, scaled(r.log_every))),
        )


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`--set key=value` items as a dict (values stay text; `override` coerces them to the field's type)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, like optim.muon_lr=0.03")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# ---- presets -----------------------------------------------------------------------------------
def _record() -> TrainConfig:
    """Record #89's values; of the blocks it added to the list in DESIGN.md, those built so far are on here: the
    bigram embedding's xor hash over 377,280 buckets with the sign trick, MUDD routing (speedrun.mudd: per-token
    gates and coefficients, the layer-3 skip and layer-7 snapshot, instead of U-net skips and x0 lambdas) with
    learnable XSA on layers 1, 3, 4, 7, attention gates on 3 and 10 and DC-MHA on 10 taking their per-token
    weights from it, per-layer SA lambdas, the prefix-token loss, q and k orthogonalised per pair of heads,
    NorMuon's statistic along each matrix's longer side, and the MLP's FP8 forward with delayed scaling."""
    base = TrainConfig()
    return replace(
        base,
        model=replace(base.model, bigram_buckets=377_280, bigram_hash="xor", bigram_sign_rows=8192,
                      xsa_layers=(1, 3, 4, 7), qk_head_pairs=True, use_sa_lambdas=True,
                      mudd=True, use_skip_connections=False, dc_layers=(10,), prefix_vocab="gpt2",
                      ve_gate_input="x_ve", fp8_mlp_scaling="delayed",
                      # record #89's train_gpt.py: keys shifted on head_dim // 2 dims, Yarn's scale 0.1, slope 0.2
                      key_offset_dims=64, attn_scale=0.1, yarn_attn_slope=0.2),
        # its MLP matrices are stored (3072, 768), so c_proj's shape factor is 2, times its own 2; ours is (768,
        # 3072), factor 1: the same step needs 4 here. Adam decays by lr^2 * wd * wd_mult.
        optim=replace(base.optim, normuon_axis="larger", muon_mlp_out_lr_mult=4.0, adam_wd_power=2,
                      ve_gate_lr_mult=1.0, ve_gate_wd_mult=1.0, smear_gate_lr_mult=0.01),
        # the prefix-token loss (GPT-2's vocabulary, through tiktoken): 0.25 through stage 0, annealed to 0 over
        # stage 1
        schedule=replace(base.schedule, prefix_start=(0.25, 0.25, 0.0, 0.0), prefix_end=(0.25, 0.0, 0.0, 0.0)),
        )


def _tiny() -> TrainConfig:
    """The record's architecture and schedule shape, scaled to learn the sample corpus on 2 CPU cores."""
    return TrainConfig(
        model=ModelConfig(
            vocab_size=128,
            padded_vocab_size=128,
            n_layer=6,
            n_head=4,
            head_dim=32,
            dim=128,
            mlp_dim=384,
            block_size=16,
            no_attn_layers=(3,),
            long_window_layers=(2, 5),
            value_embed_layers=(1, 4, 5),
            paired_head_layers=(0, 4),
            bigram_buckets=4096,
            key_offset_dims=8,
            mudd_skip_from=1,  # MUDD's layers, should it be switched on here (model.mudd=true,
            mudd_attn_from=4,  # model.use_skip_connections=false)
            mudd_gate_layer=2,
            attn_gate_layers=(2, 5),
            untie_step=170,
        ),
        optim=OptimConfig(muon_lr=0.02, muon_wd=0.5, adam_lr=0.008, muon_momentum_warmup_steps=50,
                          muon_momentum_cooldown_steps=10, value_embed_lr_mult=10.0, embed_wd_mult=10.0),
        schedule=ScheduleConfig(
            num_scheduled_steps=260,
            extension_steps=10,
            cooldown_frac=0.5,
            stage_starts=(0, 85, 170),
            tokens_per_step=(2048, 2048, 3072, 3072),
            max_seq_lens=(256, 512, 512, 512),
            short_windows=(1, 3, 5, 6),
            long_windows=(3, 7, 11, 13),
            final_long_window=20,
        ),
        data=DataConfig(
            source="sample",
            val_tokens=32768,
            bos_id=SAMPLE_BOS_ID,
            max_micro_batch_tokens=1024,
            val_micro_batch_tokens=8192,
        ),
        run=RunConfig(val_every=50, log_every=10, warmup_steps=1, target_loss=1.25, compile=False),
    )


def _record_sample() -> TrainConfig:
    """The record model on the generated sample corpus, every stage at stage 3's shape (one compiled graph),
    50 steps: a GPU demo whose losses and times have a track of their own (`record-sample`), never track1's."""
    rec = _record()
    s = rec.schedule
    n = s.num_stages
    cfg = replace(
        rec,
        schedule=replace(s, tokens_per_step=(s.tokens_per_step[2],) * n, max_seq_lens=(s.max_seq_lens[2],) * n,
                         short_windows=(s.short_windows[2],) * n, long_windows=(s.long_windows[2],) * n,
                         mtp_start=((1.0,),) * n, mtp_end=((1.0,),) * n, final_long_window=s.long_windows[2],
                         prefix_start=(), prefix_end=()),
        model=replace(rec.model, prefix_vocab=""),  # the sample corpus's symbols have no byte strings
        data=replace(rec.data, source="sample", bos_id=SAMPLE_BOS_ID, val_tokens=196_608,
                     val_micro_batch_tokens=rec.data.max_micro_batch_tokens),
    )
    return cfg.with_total_steps(50)


def public_2508_windows(steps: int, growth: float = 1728 / 128) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(stage starts, short windows, long windows) in blocks of the public trainer of August 2025, whose long
    window grows with the step as W = max(1, ceil(13.5 * step / steps)) blocks (1728 tokens rounded up to whole
    128-token blocks, L922-928) and whose short window is W // 2 (at least one block): one stage per value of W,
    the last (extension) stage at the final W."""
    long_at = [max(1, math.ceil(growth * step / steps)) for step in range(steps)]
    starts = tuple(step for step in range(steps) if step == 0 or long_at[step] != long_at[step - 1])
    longs = tuple(long_at[s] for s in starts) + (long_at[-1],)
    return starts, tuple(max(1, w // 2) for w in longs), longs


def _public_2508() -> TrainConfig:
    """The architecture, optimisers and schedule of the public speedrun trainer of August 2025 (the
    `../shared/reference/public_train_gpt.py` of this project; its line numbers in the comments): 12 layers
    without attention on layer 7, three value-embedding tables shared as 012...012 and mixed by learned lambdas,
    plain Muon (quintic Newton-Schulz) with the attention gates, Adam groups at 0.6 / 0.008 / 0.04, windows
    growing 128 -> 1792 tokens with the step, softcap 30·σ(z/7.5), FP8 lm_head only, no multi-token prediction."""
    steps = 1695  # num_iterations (L834)
    starts, shorts, longs = public_2508_windows(steps)
    n = len(starts) + 1
    return TrainConfig(
        model=ModelConfig(n_layer=12, no_attn_layers=(7,), long_window_layers=(0, 4, 7, 11),  # L643, L739
                          value_embed_layers=(0, 1, 2, 9, 10, 11), value_embed_tables=3, value_embed_mix="lambda",
                          use_smear_gate=False, use_bigram_embed=False, use_paired_heads=False, paired_head_layers=(),
                          use_key_offset=False, key_offset_dims=0,
                          use_yarn=False, softcap_scale=30.0, softcap_shift=0.0, softcap_div=7.5, untie_step=-1,
                          fp8_mlp=False, init="public-2508"),
        optim=OptimConfig(muon_lr=0.05, muon_wd=0.0, muon_momentum_cooldown_steps=0, muon_mlp_out_lr_mult=1.0,
                          # our fc is (3072, 768): max(1, rows/cols)^0.5 = 2, the public file's (768, 3072) gets 1
                          muon_mlp_in_lr_mult=0.5, muon_variant="muon", muon_ns="quintic", attn_gate_on_muon=True,
                          # its loss is a sum over each rank's 49,152 tokens: eps 1e-10 on that scale (8 GPUs)
                          adam_eps=1e-10 / 49152, adam_wd=0.0, adam_every=1, embed_lr_mult=75.0, head_lr_mult=1.0,
                          embed_betas=(0.8, 0.95), value_embed_betas=(0.8, 0.95), scalar_betas=(0.8, 0.95),
                          cautious_wd=False),
        schedule=ScheduleConfig(num_scheduled_steps=steps, extension_steps=0, cooldown_frac=0.45, final_lr_frac=0.1,
                                stage_starts=starts, tokens_per_step=(393216,) * n, max_seq_lens=(49152,) * n,
                                short_windows=shorts, long_windows=longs, stage_lr_mults=(1.0,) * n,
                                mtp_start=((1.0,),) * n, mtp_end=((1.0,),) * n, final_long_window=longs[-1]),
        # the file validates 262,144 tokens per forward; here validation on the compiled path runs under autograd and
        # the FP8 head makes its logit gradient in forward, which at that size does not fit one H200 (seen: OOM)
        data=DataConfig(val_micro_batch_tokens=65536),
        run=RunConfig(val_every=125),
    )


PRESETS = {"record": _record, "tiny": _tiny, "record-sample": _record_sample, "public-2508": _public_2508}


# ---- validation --------------------------------------------------------------------------------
def validate_mudd(m: ModelConfig, need) -> None:
    """The MUDD routing's layers must exist where it reads and writes them (speedrun.mudd)."""
    L, last = m.n_layer, m.n_layer - 1
    attn_layers = [i for i in range(L) if i not in m.no_attn_layers]
    need(all(i in attn_layers for i in m.dc_layers), "model.dc_layers", "must be layers with attention")
    need(not m.dc_layers or m.mudd, "model.dc_layers", "DC-MHA takes its weights from MUDD: set model.mudd=true")
    need(not (m.use_paired_heads and set(m.dc_layers) & set(m.paired_head_layers)), "model.dc_layers",
         "not on paired-head layers")
    need(m.dc_window >= 1, "model.dc_window", "must be >= 1")
    if not m.mudd:
        return
    need(not m.use_skip_connections, "model.use_skip_connections", "MUDD replaces the U-net skips: set it false")
    need(m.mudd_dim > 0, "model.mudd_dim", "must be > 0")
    need(last in attn_layers and 0 in attn_layers, "model.no_attn_layers",
         "MUDD needs attention on the first and the last layer")
    need(m.n_head % 2 == 0, "model.n_head", "MUDD's value-embedding gate has two lanes: needs an even n_head")
    need(0 <= m.mudd_attn_from < last, "model.mudd_attn_from", f"must be a layer before the last ({last})")
    need(all(m.mudd_skip_from < i for i in m.no_attn_layers) and m.mudd_skip_from >= 0, "model.mudd_skip_from",
         "must be a layer before the attention-free layer")
    need(1 <= m.mudd_gate_layer < L, "model.mudd_gate_layer", f"must be in [1, {L})")
    need(all(i in attn_layers for i in m.attn_gate_layers), "model.attn_gate_layers",
         "must be layers with attention")


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first bad key and what would fix it."""
    m, o, s, d, r = cfg.model, cfg.optim, cfg.schedule, cfg.data, cfg.run

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"{key}={_show(cfg, key)}: {msg}")

    for key in ("model.n_layer", "model.n_head", "model.head_dim", "model.dim", "model.mlp_dim",
                "model.block_size", "model.vocab_size", "model.bigram_buckets", "model.gate_dims",
                "model.loss_chunk_tokens"):
        need(_get(cfg, key) > 0, key, "must be a positive integer")
    need(m.padded_vocab_size >= m.vocab_size, "model.padded_vocab_size", "must be >= model.vocab_size")
    need(m.dim == m.n_head * m.head_dim, "model.dim", f"must equal n_head*head_dim = {m.n_head * m.head_dim}")
    need(m.head_dim % 4 == 0, "model.head_dim", "must be a multiple of 4 (half-RoPE pairs)")
    need(m.gate_dims <= m.dim, "model.gate_dims", "must be <= model.dim")
    need(0 <= m.key_offset_dims <= m.head_dim // 2, "model.key_offset_dims", "must be in [0, head_dim/2]")
    for key in ("model.no_attn_layers", "model.long_window_layers", "model.value_embed_layers",
                "model.paired_head_layers"):
        need(all(0 <= i < m.n_layer for i in _get(cfg, key)), key, f"layer indices must be in [0, {m.n_layer})")
    need(not (m.use_paired_heads and m.paired_head_layers) or m.n_head % 2 == 0, "model.n_head",
         "must be even when paired-head attention is on")
    need(m.softcap_scale > 0 and m.softcap_div > 0, "model.softcap_scale", "softcap scale and div must be > 0")
    need(math.isfinite(m.softcap_shift), "model.softcap_shift", "must be finite")
    need(0 < m.rope_min_freq < 1, "model.rope_min_freq", "must be in (0, 1)")
    need(m.attn_scale > 0, "model.attn_scale", "must be > 0")
    need(m.attn_kernel in ("auto", "flex", "sdpa"), "model.attn_kernel", "must be auto, flex or sdpa")
    need(m.value_embed_tables >= 0, "model.value_embed_tables", "must be >= 0 (0: one table per layer)")
    need(m.value_embed_mix in ("gate", "lambda"), "model.value_embed_mix", "must be gate or lambda")
    need(m.init in ("record", "public-2508"), "model.init", "must be record or public-2508")
    need(m.bigram_hash in ("mul", "xor"), "model.bigram_hash", "must be mul or xor")
    need(m.fp8_mlp_scaling in ("current", "delayed"), "model.fp8_mlp_scaling", "must be current or delayed")
    need(m.table_dtype in ("float32", "bfloat16"), "model.table_dtype", "must be float32 or bfloat16")
    need(m.fp8_act_headroom >= 1 and m.fp8_weight_headroom >= 1, "model.fp8_act_headroom",
         "FP8 headrooms must be >= 1 (the scale covers at least the last amax)")
    need(m.fp8_bootstrap_steps >= 0, "model.fp8_bootstrap_steps", "must be >= 0")
    need(m.ve_gate_input in ("x", "x_ve"), "model.ve_gate_input", "must be x or x_ve")
    need(m.ve_gate_input == "x" or m.gate_dims % 2 == 0, "model.gate_dims", "must be even with ve_gate_input=x_ve")
    need(m.bigram_sign_rows >= 0, "model.bigram_sign_rows", "must be >= 0 (0: no sign trick)")
    need(all(0 <= i < m.n_layer and i not in m.no_attn_layers for i in m.xsa_layers), "model.xsa_layers",
         "must be layers with attention")
    need(not (m.use_paired_heads and set(m.xsa_layers) & set(m.paired_head_layers)), "model.xsa_layers",
         "XSA needs a layer's own values: not on paired-head layers")
    need(not m.qk_head_pairs or m.n_head % 2 == 0, "model.qk_head_pairs", "needs an even model.n_head")
    validate_mudd(m, need)

    for key in ("optim.muon_lr", "optim.adam_lr", "optim.adam_eps", "optim.muon_mlp_out_lr_mult",
                "optim.muon_mlp_in_lr_mult", "optim.embed_lr_mult", "optim.head_lr_mult", "optim.value_embed_lr_mult",
                "optim.scalar_lr_mult"):
        need(_get(cfg, key) > 0, key, "must be > 0")
    for key in ("optim.muon_wd", "optim.adam_wd", "optim.embed_wd_mult", "optim.value_embed_wd_mult",
                "optim.scalar_wd_mult", "optim.muon_momentum_warmup_steps", "optim.muon_momentum_cooldown_steps"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    for key in ("optim.muon_momentum", "optim.muon_momentum_min", "optim.muon_beta2"):
        need(0 <= _get(cfg, key) < 1, key, "must be in [0, 1)")
    for key in ("optim.mudd_lr_mult", "optim.mudd_gate_lr_mult", "optim.resid_lambda_lr_mult",
                "optim.post_lambda_lr_mult", "optim.ve_gate_lr_mult", "optim.smear_gate_lr_mult"):
        need(_get(cfg, key) > 0, key, "must be > 0")
    for key in ("optim.embed_betas", "optim.value_embed_betas", "optim.scalar_betas", "optim.mudd_betas",
                "optim.lambda_betas"):
        b = _get(cfg, key)
        need(len(b) == 2 and all(0 <= x < 1 for x in b), key, "must be two betas in [0, 1)")
    need(o.polar_express_steps >= 1, "optim.polar_express_steps", "must be >= 1")
    need(o.muon_variant in ("normuon", "muon"), "optim.muon_variant", "must be normuon or muon")
    need(o.normuon_axis in ("rows", "larger"), "optim.normuon_axis", "must be rows or larger")
    need(o.adam_wd_power in (1, 2), "optim.adam_wd_power", "must be 1 (lr * wd) or 2 (lr^2 * wd)")
    need(o.muon_ns in ("polar_express", "quintic"), "optim.muon_ns", "must be polar_express or quintic")
    need(o.adam_every >= 1, "optim.adam_every", "must be >= 1")

    n = s.num_stages
    need(s.num_scheduled_steps >= 1, "schedule.num_scheduled_steps", "must be >= 1")
    need(s.extension_steps >= 0, "schedule.extension_steps", "must be >= 0")
    need(0 <= s.cooldown_frac <= 1, "schedule.cooldown_frac", "must be in [0, 1]")
    need(0 <= s.final_lr_frac <= 1, "schedule.final_lr_frac", "must be in [0, 1]")
    need(len(s.stage_starts) >= 1 and s.stage_starts[0] == 0, "schedule.stage_starts", "must start with 0")
    need(all(a < b for a, b in zip(s.stage_starts, s.stage_starts[1:])) and s.stage_starts[-1] < s.num_scheduled_steps,
         "schedule.stage_starts", f"must increase strictly and stay below num_scheduled_steps={s.num_scheduled_steps}")
    for key in ("schedule.tokens_per_step", "schedule.max_seq_lens", "schedule.short_windows",
                "schedule.long_windows", "schedule.stage_lr_mults", "schedule.mtp_start", "schedule.mtp_end"):
        need(len(_get(cfg, key)) == n, key, f"needs one entry per stage ({n}: the stage_starts plus the extension)")
    for k in range(n):
        need(s.tokens_per_step[k] > 0, "schedule.tokens_per_step", "must be > 0")
        need(1 <= s.short_windows[k] <= s.long_windows[k], "schedule.short_windows",
             f"stage {k}: short window must be in [1, long window {s.long_windows[k]}]")
        need(s.long_windows[k] * m.block_size <= s.max_seq_lens[k], "schedule.long_windows",
             f"stage {k}: long window x block_size must fit max_seq_len {s.max_seq_lens[k]}")
        need(s.stage_lr_mults[k] >= 0, "schedule.stage_lr_mults", "must be >= 0")
        need(len(s.mtp_start[k]) == len(s.mtp_end[k]) >= 1, "schedule.mtp_start",
             f"stage {k}: mtp_start and mtp_end need the same number (>=1) of weights")
    for key in ("schedule.prefix_start", "schedule.prefix_end"):
        need(len(_get(cfg, key)) in (0, n) and all(w >= 0 for w in _get(cfg, key)), key,
             f"needs one weight >= 0 per stage ({n}), or none (no prefix-token loss)")
    need(len(s.prefix_start) == len(s.prefix_end), "schedule.prefix_end", "needs as many weights as prefix_start")
    need(s.final_long_window >= 1, "schedule.final_long_window", "must be >= 1")

    need(d.source in ("fineweb", "sample"), "data.source", "must be 'fineweb' or 'sample'")
    need(0 <= d.bos_id < m.vocab_size, "data.bos_id", f"must be a token id below vocab_size={m.vocab_size}")
    need(d.source != "sample" or d.bos_id == SAMPLE_BOS_ID, "data.bos_id",
         f"the sample corpus uses BOS {SAMPLE_BOS_ID}: add data.bos_id={SAMPLE_BOS_ID}")
    need(d.val_tokens > 0, "data.val_tokens", "must be > 0")
    need(d.max_micro_batch_tokens > 0 and d.val_micro_batch_tokens > 0, "data.max_micro_batch_tokens", "must be > 0")

    need(r.device in ("auto", "cpu", "cuda"), "run.device", "must be auto, cpu or cuda")
    need(r.dtype in ("bfloat16", "float32"), "run.dtype", "must be bfloat16 or float32")
    need(r.val_every >= 1 and r.log_every >= 1, "run.val_every", "val_every and log_every must be >= 1")
    need(r.warmup_steps >= 0, "run.warmup_steps", "must be >= 0")
    need(r.threads >= 0, "run.threads", "must be >= 0")
    need(r.warmup_workers >= 0, "run.warmup_workers", "must be >= 0 (0: no helper processes)")


# ---- helpers -----------------------------------------------------------------------------------
def _split_key(key: str) -> tuple[str, str, int | None]:
    parts = key.split(".")
    if len(parts) not in (2, 3) or parts[0] not in SECTIONS:
        raise ValueError(f"unknown config key {key!r}: keys look like 'optim.muon_lr' (sections: {', '.join(SECTIONS)})")
    section, name = parts[0], parts[1]
    names = _field_names(section)
    if name not in names:
        close = [n for n in names if n.split("_")[0] in name or name.split("_")[0] in n][:4]
        hint = f" (did you mean {', '.join(section + '.' + c for c in close)}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}")
    index = None
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise ValueError(f"config key {key!r}: only tuple knobs take an index, like schedule.long_windows.2")
        index = int(parts[2])
    return section, name, index


def _field_names(section: str) -> list[str]:
    cls = {"model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
           "data": DataConfig, "run": RunConfig}[section]
    return [f.name for f in fields(cls)]


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn `value` (maybe a CLI string) into the type `hint`, or raise ValueError naming `key`."""
    if isinstance(value, str) and hint is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if hint is bool and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            else:
                raise ValueError(f"{key}: cannot read {value!r} as {_type_name(hint)}") from None
    try:
        if hint is bool:
            if not isinstance(value, (bool, int)) or value not in (0, 1, True, False):
                raise TypeError
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if get_origin(hint) is tuple:
            (inner, *_rest) = get_args(hint)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(_coerce(key, v, inner) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected {_type_name(hint)}, got {value!r}") from None
    raise ValueError(f"{key}: unsupported type {hint}")


def _type_name(hint: Any) -> str:
    if get_origin(hint) is tuple:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _build(sections: dict[str, dict[str, Any]]) -> TrainConfig:
    classes = {"model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
               "data": DataConfig, "run": RunConfig}
    built = {}
    for s, cls in classes.items():
        hints = get_type_hints(cls)
        built[s] = cls(**{k: _coerce(f"{s}.{k}", v, hints[k]) for k, v in sections[s].items()})
    return TrainConfig(**built)


def _get(cfg: TrainConfig, key: str) -> Any:
    section, name = key.split(".")[:2]
    return getattr(getattr(cfg, section), name)


def _show(cfg: TrainConfig, key: str) -> str:
    return json.dumps(_jsonable(_get(cfg, key)))


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


# ---- what compiles -------------------------------------------------------------------------------
# Knobs whose values are baked into compiled graphs: shapes (batch, sequence, windows, widths), layer
# switches, Python-level branches and loop counts. Every other knob reaches compiled code as a tensor or
# only moves the schedule, so changing it between trials reuses the compiled graphs.
_MODEL_TENSOR_KNOBS = {"softcap_scale", "softcap_shift", "softcap_div", "attn_scale", "rope_min_freq", "untie_step",
                       "yarn_attn_slope", "fp8_act_headroom", "fp8_weight_headroom", "fp8_bootstrap_steps"}
_GRAPH_KNOBS = {
    "schedule": {"tokens_per_step", "max_seq_lens", "short_windows", "long_windows", "final_long_window"},
    "optim": {"polar_express_steps", "cautious_wd", "muon_variant", "muon_ns", "attn_gate_on_muon", "normuon_axis"},
    "data": {"max_micro_batch_tokens", "val_micro_batch_tokens", "val_tokens", "bos_id"},
    "run": {"compile", "dtype", "device"},
}


def recompiles(key: str) -> bool:
    """Whether changing this dotted knob (`schedule.long_windows.2` too) changes the compiled graphs."""
    section, name, _ = _split_key(key)
    if section == "model":
        return name not in _MODEL_TENSOR_KNOBS
    return name in _GRAPH_KNOBS.get(section, set())


def graph_signature(cfg: TrainConfig) -> dict[str, Any]:
    """The values that decide which graphs a run compiles (plus the number of stages and of MTP targets).
    Two configs with the same signature, on the same world size and GPU, compile the same graphs."""
    flat = cfg.to_dict()
    sig = {k: v for k, v in flat.items() if recompiles(k)}
    sig["schedule.num_stages"] = cfg.schedule.num_stages
    sig["schedule.mtp_lengths"] = [len(w) for w in cfg.schedule.mtp_start]
    s = cfg.schedule  # a stage with a prefix-token loss has its own graph; the weights themselves are tensors
    sig["schedule.prefix_stages"] = [bool(a or b) for a, b in zip(s.prefix_start, s.prefix_end)]
    return sig
