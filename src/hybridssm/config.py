"""Base configuration: frozen dataclasses with validation, suggestions and JSON round trips.

Every model has one config class (``MambaConfig``, ``HymbaConfig``, ...) derived from
:class:`ModelConfig`. ``build(name, **opts) == Model(Config(**opts))``. Validation runs in
``__post_init__``, so a bad value fails before any weight is allocated. Lists become tuples there, also
inside a mapping (hybrid's ``backbone_options``), so that a config equals its JSON round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from hybridssm.checks import (
    check_bool,
    check_choice,
    check_nonnegative,
    check_optional_positive,
    check_positive,
    check_positive_float,
    check_probability,
    suggest,
    unknown_option_error,
)
from hybridssm.layers import FFN_ACTIVATIONS, NORMS, POSITIONAL, check_dt_range
from hybridssm.mixers.attention import attention_impl
from hybridssm.mixers.mamba import DT_INITS
from hybridssm.mixers.mamba2 import check_mamba2_options, mamba2_heads
from hybridssm.ops.ssd import DEFAULT_CHUNK_SIZE

__all__ = [
    "ModelConfig",
    "SSMConfig",
    "AttentionConfig",
    "SelectiveSSMConfig",
    "SelectiveSSMOptions",
    "MambaOptions",
    "Mamba2Options",
    "check_positive",
    "check_nonnegative",
    "check_probability",
    "check_choice",
    "check_bool",
    "check_optional_positive",
    "check_positive_float",
    "suggest",
    "unknown_option_error",
]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Options shared by every model (names and defaults follow the seeds).

    Attributes:
        embed_dim: size of each input frame (required).
        hidden_size: width of the residual stream, and the output size.
        num_layers: number of blocks.
        dropout: dropout rate between blocks (0 disables it).
        window_size: the seeds' "expected sequence length"; where a model's attention slides it is
            the attention window (W keys, the current one included). Never a length limit elsewhere.
        seq_len: the seeds' fixed length for JIT; stored only (defaults to ``window_size``).
        checkpoint_every: gradient checkpointing, one segment of this many blocks (0 = off).
        norm: the block and final norms, ``"layernorm"`` (the seeds') or ``"rmsnorm"``
            (``transformers``' Mamba, Mamba2 and Jamba; ``mamba_ssm``'s ``rms_norm=True``).
        norm_eps: their epsilon; None (default) keeps each norm's own (LayerNorm 1e-5,
            RMSNorm 1e-6; ``transformers``' ``layer_norm_epsilon`` is 1e-5, Jamba's
            ``rms_norm_eps`` 1e-6).
        residual_in_fp32: keep the residual stream between and inside the blocks in fp32 (the
            wider of fp32 and the model's dtype) while each block's norm output, mixers, fusion
            and FFN compute in the dtype the stream entered the blocks in (the model's, or
            autocast's); the final norm reads the fp32 stream and the output is returned in that
            dtype. ``transformers``' and ``mamba_ssm``'s Mamba option of that name: True for
            ``mamba`` and ``mamba2`` (their default), False elsewhere (the seeds and Jamba keep the
            stream in the model's dtype). It acts only in a lower precision (a bf16/fp16 model, or
            autocast): in fp32 and fp64 it changes nothing. States keep the model's dtype (they
            hold mixer inputs, never the stream); the fused step runs fp32/fp64 models only, where
            the option has no effect.
    """

    model_name: ClassVar[str] = ""
    recommended: ClassVar[dict] = {}

    embed_dim: int
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    window_size: int = 60
    seq_len: int | None = None
    checkpoint_every: int = 0
    norm: str = "layernorm"
    norm_eps: float | None = None
    residual_in_fp32: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):  # frozen: lists become tuples, also nested (JSON gives them back as lists)
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple, Mapping)):
                object.__setattr__(self, f.name, _frozen(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option, the value and what is allowed."""
        for name in ("embed_dim", "hidden_size", "num_layers", "window_size"):
            check_positive(name, getattr(self, name))
        if self.seq_len is not None:
            check_positive("seq_len", self.seq_len)
        check_nonnegative("checkpoint_every", self.checkpoint_every)
        check_probability("dropout", self.dropout)
        check_choice("norm", self.norm, NORMS)
        if self.norm_eps is not None:
            check_positive_float("norm_eps", self.norm_eps)
        check_bool("residual_in_fp32", self.residual_in_fp32)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_options(cls, **opts: Any) -> ModelConfig:
        """Build from keyword options; an unknown one raises ``TypeError`` with a suggestion."""
        known = set(cls.option_names())
        for name in opts:
            if name not in known:
                raise unknown_option_error(f"{cls.model_name or cls.__name__}", name, known)
        missing = [
            f.name
            for f in fields(cls)
            if f.name not in opts
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise TypeError(
                f"{cls.model_name or cls.__name__} needs option(s) {', '.join(map(repr, missing))}"
            )
        return cls(**opts)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated, unknown names rejected)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self).from_options(**{**current, **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls.from_options(**data)  # JSON's lists become the config's tuples in __post_init__

    def to_json(self) -> str:
        return json.dumps({"model": self.model_name, "config": self.to_dict()}, indent=2)

    @property
    def expected_seq_len(self) -> int:
        """The seeds' expected sequence length (``seq_len``, else ``window_size``)."""
        return self.seq_len or self.window_size


@dataclass(frozen=True, kw_only=True)
class SSMConfig(ModelConfig):
    """The seed's Mamba options, shared by the pure SSM stacks (``gated_ssm``, ``mamba``,
    ``mamba2``), with the seed's defaults and recommended values.

    Attributes:
        state_size: N, the SSM state size.
        expand_factor: inner width ``E = expand_factor * hidden_size``.
        conv_size: K, the width of the causal conv.
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
        window_size=60, dropout=0.1,
    )

    state_size: int = 16
    expand_factor: int = 2
    conv_size: int = 4
    num_layers: int = 2

    def validate(self) -> None:
        super().validate()
        for name in ("state_size", "expand_factor", "conv_size"):
            check_positive(name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(ModelConfig):
    """The attention and FFN options shared by ``hybrid`` and ``transformer`` (each sets its own
    defaults: the seed's for ``hybrid``, ours for ``transformer``).

    Attributes:
        num_heads: query heads H.
        head_dim: width per head Dh (see :attr:`attn_head_dim` for None).
        num_kv_heads: key/value heads (grouped-query attention, Ainslie et al. 2023); must divide
            ``num_heads``; None (default) = ``num_heads`` (``transformers``' ``num_key_value_heads``).
            The streaming cache holds ``num_kv_heads`` heads.
        rope_theta: RoPE's frequency base (10000, ``transformers``' default); only with
            ``positional="rope"``.
        attention_dropout: dropout on the attention probabilities in training (0, the seeds' and
            ``transformers``' default); needs full attention in the ``"sdpa"`` form.
        qk_layernorm: LayerNorm over Dh of q and k.
        use_sliding_window: attend to the last ``window_size`` keys (self included) instead of all.
        chunked_attention, memory_efficient_attention: the seed's attention variants (its
            ``build_attention_layer`` calls them ``chunked`` and ``memory_efficient``): training
            forms ``"chunked"`` / ``"memory_efficient"`` (O(T) memory); neither = ``"sdpa"``.
        chunk_size: their chunk (and the block of the sliding-window forms).
        positional: ``"none"``, ``"sinusoidal"`` (textbook), ``"seed_sinusoidal"`` (the seeds'
            ``add_positional_encoding``), ``"rope"`` or ``"learned"`` (up to ``max_positions``).
        ffn_multiplier: the attention layers' FFN width is ``ffn_multiplier * hidden_size`` (4).
        ffn_activation: ``"gelu"`` (the seeds') or ``"swiglu"`` (LLaMA, Jamba).
    """

    num_heads: int = 4
    head_dim: int | None = 64
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    attention_dropout: float = 0.0
    qk_layernorm: bool = False
    use_sliding_window: bool = False
    chunked_attention: bool = False
    memory_efficient_attention: bool = False
    chunk_size: int = 32
    positional: str = "none"
    max_positions: int = 4096
    ffn_multiplier: int = 4
    ffn_activation: str = "gelu"

    def validate(self) -> None:
        super().validate()
        for name in ("num_heads", "chunk_size", "max_positions", "ffn_multiplier"):
            check_positive(name, getattr(self, name))
        check_optional_positive("head_dim", self.head_dim)
        check_optional_positive("num_kv_heads", self.num_kv_heads)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"option 'num_kv_heads' must divide num_heads={self.num_heads}, got {self.num_kv_heads}"
            )
        for name in ("qk_layernorm", "use_sliding_window", "chunked_attention",
                     "memory_efficient_attention"):
            check_bool(name, getattr(self, name))
        impl = attention_impl(self.chunked_attention, self.memory_efficient_attention)
        check_choice("positional", self.positional, POSITIONAL)
        check_choice("ffn_activation", self.ffn_activation, FFN_ACTIVATIONS[:2])
        check_positive_float("rope_theta", self.rope_theta)
        if self.rope_theta != 10000.0 and self.positional != "rope":
            raise ValueError(
                f"option 'rope_theta'={self.rope_theta!r} changes nothing with "
                f"positional={self.positional!r}; it is allowed only with positional='rope'"
            )
        check_probability("attention_dropout", self.attention_dropout)
        if self.attention_dropout > 0 and (self.use_sliding_window or impl != "sdpa"):
            raise ValueError(
                f"option 'attention_dropout'={self.attention_dropout!r} needs full attention in the "
                "'sdpa' form (use_sliding_window=False, chunked_attention=False, "
                "memory_efficient_attention=False)"
            )

    @property
    def attn_head_dim(self) -> int:
        """The head width used: ``head_dim``, else ``min(64, max(1, hidden_size // num_heads))``."""
        if self.head_dim is not None:
            return self.head_dim
        return min(64, max(1, self.hidden_size // self.num_heads))


@dataclass(frozen=True, kw_only=True)
class SelectiveSSMOptions:
    """The ``mamba_ssm`` / ``transformers`` options of a selective SSM path, Mamba-1 or Mamba-2
    (their defaults): a mixin of every config with such a path (``mamba``, ``mamba2``, ``hymba``,
    ``ss_transformer``), placed before its :class:`ModelConfig` base.

    Attributes:
        dt_min, dt_max: the initial time steps ``softplus(dt_bias)`` are log-uniform in this range
            (``time_step_min`` / ``time_step_max``: 1e-3, 1e-1).
        dt_init_floor: the smallest initial time step (``time_step_floor``: 1e-4).
        conv_bias: a bias in the causal conv (``use_conv_bias``: True).
        proj_bias: biases in the input and output projections (``use_bias``: False).
    """

    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]  (the ModelConfig this is mixed into)
        check_dt_range(self.dt_min, self.dt_max, self.dt_init_floor)
        check_bool("conv_bias", self.conv_bias)
        check_bool("proj_bias", self.proj_bias)

    def selective_options(self) -> dict[str, Any]:
        """These options as the keyword arguments of the Mamba and Mamba-2 mixers."""
        return dict(dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=self.dt_init_floor,
                    conv_bias=self.conv_bias, proj_bias=self.proj_bias)


@dataclass(frozen=True, kw_only=True)
class MambaOptions(SelectiveSSMOptions):
    """:class:`SelectiveSSMOptions` and the Mamba-1 time-step projection's (``mamba``,
    ``hymba``, ``ss_transformer``).

    Attributes:
        dt_rank: rank of the time-step projection; None = ``ceil(hidden_size / 16)`` (``"auto"``).
        dt_init: ``"random"`` (U(+-dt_rank^-0.5), the default) or ``"constant"`` initial
            time-step projection (``time_step_init_scheme``).
    """

    dt_rank: int | None = None
    dt_init: str = "random"

    def validate(self) -> None:
        super().validate()
        check_optional_positive("dt_rank", self.dt_rank)
        check_choice("dt_init", self.dt_init, DT_INITS)

    def mamba_options(self) -> dict[str, Any]:
        """These options as :class:`~hybridssm.mixers.mamba.MambaMixer` keyword arguments."""
        return dict(self.selective_options(), dt_rank=self.dt_rank, dt_init=self.dt_init)


@dataclass(frozen=True, kw_only=True)
class Mamba2Options(SelectiveSSMOptions):
    """:class:`SelectiveSSMOptions` and Mamba-2's own, with ``mamba_ssm``'s defaults: a mixin of
    every config with a Mamba-2 path (``mamba2``; ``ss_transformer``, used with ``ssm="mamba2"``),
    whose config has ``hidden_size`` and ``expand_factor``. ``hybrid(backbone="mamba2")`` takes
    the same names, defaults and checks in ``backbone_options``.

    Attributes:
        ssm_head_dim: P, the SSD head width (``headdim``; ``transformers``' ``head_dim``); must
            divide ``d_inner = expand_factor * hidden_size``. None (default): the largest divisor of
            ``d_inner`` that is at most 64 (64 at the default sizes: 8 heads).
        num_groups: G, groups of heads sharing B and C (``ngroups``; ``transformers``'
            ``n_groups``); must divide the number of heads.
        scan_chunk_size: chunk length of the chunked SSD scan (``chunk_size``; speed only).
        A_init_range: ``A = -exp(A_log)`` starts at ``-U(lo, hi)`` per head ((1, 16)).
        dt_limit: ``dt`` clamped to ``(lo, hi)`` after the softplus ((0, inf): no clamp;
            ``time_step_limit``).
        D_has_hdim: the skip ``D`` per channel instead of per head (False).
        norm_before_gate: ``rmsnorm(y) * silu(z)`` instead of ``rmsnorm(y * silu(z))`` (False).

    The model's ``norm_eps`` is also the epsilon of the mixer's gated RMSNorm (None: 1e-5, the
    reference's).
    """

    ssm_head_dim: int | None = None
    num_groups: int = 1
    scan_chunk_size: int = DEFAULT_CHUNK_SIZE
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_limit: tuple[float, float] = (0.0, math.inf)
    D_has_hdim: bool = False
    norm_before_gate: bool = False

    def validate(self) -> None:
        super().validate()
        check_mamba2_options(**self.mamba2_options())
        d_inner = self.expand_factor * self.hidden_size  # type: ignore[attr-defined]
        mamba2_heads(d_inner, self.ssm_head_dim, self.num_groups)

    def mamba2_options(self) -> dict[str, Any]:
        """These options as :class:`~hybridssm.mixers.mamba2.Mamba2Mixer` keyword arguments."""
        return dict(
            self.selective_options(), ssm_head_dim=self.ssm_head_dim, num_groups=self.num_groups,
            scan_chunk_size=self.scan_chunk_size, A_init_range=self.A_init_range,
            dt_limit=self.dt_limit, D_has_hdim=self.D_has_hdim,
            norm_before_gate=self.norm_before_gate,
            norm_eps=1e-5 if self.norm_eps is None else self.norm_eps,  # type: ignore[attr-defined]
        )


def own_options(mixin: type) -> dict[str, Any]:
    """The options a path's mixin (:class:`MambaOptions`, :class:`Mamba2Options`) adds to the
    shared :class:`SelectiveSSMOptions`, with their defaults."""
    shared = {f.name for f in fields(SelectiveSSMOptions)}
    return {f.name: f.default for f in fields(mixin) if f.name not in shared}


@dataclass(frozen=True, kw_only=True)
class SelectiveSSMConfig(SelectiveSSMOptions, SSMConfig):
    """The options ``mamba`` and ``mamba2`` share with ``mamba_ssm`` / ``transformers`` (their
    defaults): :class:`SelectiveSSMOptions`, and ``residual_in_fp32`` True (see
    :class:`ModelConfig`)."""

    residual_in_fp32: bool = True

    def mixer_options(self) -> dict[str, Any]:
        """The mixer keyword arguments these options give (shared ones; subclasses add theirs)."""
        return dict(
            state_size=self.state_size, expand_factor=self.expand_factor, conv_size=self.conv_size,
            **self.selective_options(),
        )


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def _frozen(value: Any) -> Any:
    """``value`` with every list (or tuple) a tuple and every mapping a dict, recursively: what a
    config holds (also inside hybrid's ``backbone_options``, e.g. Mamba-2's ``A_init_range``)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _frozen(v) for k, v in value.items()}
    return value
