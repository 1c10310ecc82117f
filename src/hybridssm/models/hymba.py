"""``hymba``: parallel Mamba + attention heads with learnable meta tokens (seed 003; Dong et al.,
"Hymba: A Hybrid-head Architecture for Small Language Models", 2024).

Meta tokens (``meta_tokens="sequence"``, default) are ``M`` learned vectors prepended to the
sequence before the first block. They pass through every layer, so both the attention K/V and the
Mamba state absorb them and their representations are updated layer by layer (cross-layer
propagation); they are dropped at the output. Attention always sees them, under a sliding window
too. Because they come first and the model is causal, the state after them does not depend on the
input: :meth:`Hymba.init_state` is that state (computed from the current parameters on every call),
and ``forward(x) == forward(x, state=init_state(B))``.

Fusion: the seed's learned sigmoid gate (``fusion="gate"``, default) or the paper's mean
(``fusion="mean"``). Either way each path's output is first RMS-normalised with learnable
per-channel gains (``fusion_norm=True``, the paper's ``beta * norm(.)``): the raw attention output
is an order of magnitude larger than the Mamba output, and fusing raw outputs lets the larger path
hide the smaller (``fusion_norm=False`` keeps that form as an ablation; the README's demo section
has the measured effect).

``meta_tokens="kv"`` is the seed's simpler variant: ``M`` learned keys/values per attention layer,
prepended to every query's keys, with no sequence tokens and no propagation across layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from hybridssm import streaming
from hybridssm.backbones import SEED_OPTIONS, build_backbone_mixer, get_backbone
from hybridssm.blocks import FUSIONS, ParallelBlock
from hybridssm.config import MambaOptions, ModelConfig, check_bool, check_choice, check_positive
from hybridssm.layers import FFN
from hybridssm.mixers.attention import AttentionMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model
from hybridssm.state import ModelState

__all__ = ["HymbaConfig", "Hymba"]


@dataclass(frozen=True, kw_only=True)
class HymbaConfig(MambaOptions, ModelConfig):
    """Options of ``hymba`` (the seed's names and defaults, plus ours, documented), and the Mamba
    path's ``mamba_ssm`` / ``transformers`` options (:class:`~hybridssm.config.MambaOptions`:
    ``dt_rank``, ``dt_min``, ``dt_max``, ``dt_init_floor``, ``dt_init``, ``conv_bias``,
    ``proj_bias``, with the ``mamba`` model's defaults).

    Attributes:
        num_meta_tokens: learnable meta tokens M.
        head_dim: attention head width (default ``hidden_size // num_heads``, at least 1).
        global_layers: indices of layers with full attention; the others attend within a sliding
            window of ``window_size`` keys (plus the meta tokens). ``None`` = every layer global
            (the seed's behaviour); NVIDIA's model uses first, middle and last.
        fusion: ``"gate"`` (the seed's sigmoid gate) or ``"mean"`` (the paper's normalised mean).
        fusion_norm: RMS-normalise each path's output, with learnable per-channel gains (the
            paper's betas), before fusing (default True, as in the paper). ``False`` fuses the raw
            outputs, as the seed's gate does; it is kept as an ablation: the attention path's output
            then dwarfs the Mamba path's (see :class:`hybridssm.blocks.GateFusion`; measured runs
            are in the README's demo section).
        meta_tokens: ``"sequence"`` (prepended tokens, propagated across layers) or ``"kv"``.
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, num_layers=4, num_heads=4, num_meta_tokens=4,
        window_size=60, dropout=0.1,
    )
    default_hidden_size: ClassVar[int] = 256
    default_state_size: ClassVar[int] = 16
    default_num_layers: ClassVar[int] = 4
    default_num_heads: ClassVar[int] = 4
    default_num_meta_tokens: ClassVar[int] = 4
    default_dropout: ClassVar[float] = 0.0

    num_layers: int = 4
    state_size: int = 16
    num_heads: int = 4
    num_meta_tokens: int = 4
    head_dim: int | None = None
    expand_factor: int = 2
    conv_size: int = 4
    global_layers: tuple[int, ...] | None = None
    fusion: str = "gate"
    fusion_norm: bool = True
    meta_tokens: str = "sequence"

    def validate(self) -> None:
        super().validate()
        for name in ("state_size", "num_heads", "num_meta_tokens", "expand_factor", "conv_size"):
            check_positive(name, getattr(self, name))
        if self.head_dim is not None:
            check_positive("head_dim", self.head_dim)
        check_choice("fusion", self.fusion, tuple(FUSIONS))
        check_bool("fusion_norm", self.fusion_norm)
        check_choice("meta_tokens", self.meta_tokens, ("sequence", "kv"))
        if self.global_layers is not None:
            layers = self.global_layers
            if not isinstance(layers, (tuple, list)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers
                for i in layers
            ):
                raise ValueError(
                    f"option 'global_layers' must be a tuple of layer indices in "
                    f"0..{self.num_layers - 1} (or None for all), got {layers!r}"
                )
            object.__setattr__(self, "global_layers", tuple(sorted(set(layers))))

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or max(1, self.hidden_size // self.num_heads)

    def is_global(self, layer: int) -> bool:
        return self.global_layers is None or layer in self.global_layers


# Batches whose resets run the meta tokens inside the step (the plan's restart): from 5 streams the
# step's products are gemm_rows.h's row blocks, where the M meta rows ride along and each weight is
# read once for both. Below (batch 1 among them) the reset's own prefill runs before the step, as
# init_state's.
RESTART_IN_STEP_MIN_BATCH = 5


# Weights saved under an older name -> their name now (read by `hs.load` and `load_state_dict`).
RENAMED_WEIGHTS = {"meta": "meta_embedding"}


def _rename_old_weights(state_dict, prefix, *_args) -> None:
    for old, new in RENAMED_WEIGHTS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


@register_model("hymba", HymbaConfig)
class Hymba(SequenceModel):
    """Parallel Mamba + attention blocks with learnable meta tokens; see the module docstring."""

    renamed_weights: ClassVar[dict[str, str]] = RENAMED_WEIGHTS

    def __init__(self, config: HymbaConfig) -> None:
        super().__init__(config)
        M = config.num_meta_tokens if config.meta_tokens == "sequence" else 0
        self.num_prefix = M
        # Small random init, like token embeddings (the paper learns them from scratch). Not named
        # `meta`, a name torch uses internally and which collided with it under export.
        self.meta_embedding = nn.Parameter(torch.randn(M, config.hidden_size) * 0.02) if M else None
        self._register_load_state_dict_pre_hook(_rename_old_weights)

    def build_blocks(self, c: HymbaConfig) -> list[nn.Module]:
        d = c.hidden_size
        seq_meta = c.num_meta_tokens if c.meta_tokens == "sequence" else 0
        kv_meta = c.num_meta_tokens if c.meta_tokens == "kv" else 0
        seed = {k: getattr(c, k) for k in SEED_OPTIONS}
        return [
            ParallelBlock(
                build_backbone_mixer(get_backbone("mamba"), d, seed, c.mamba_options()),
                AttentionMixer(
                    d,
                    c.num_heads,
                    c.attn_head_dim,
                    window_size=None if c.is_global(i) else c.window_size,
                    num_prefix=seq_meta,
                    num_memory_kv=kv_meta,
                ),
                d,
                fusion=FUSIONS[c.fusion](d, normalize=c.fusion_norm),
                ffn=FFN(d, 4),
                norm=c.norm,
                norm_eps=c.norm_eps,
            )
            for i in range(c.num_layers)
        ]

    def _run_blocks(self, h: Tensor, layer_states, lengths, inplace):
        if layer_states is not None or self.meta_embedding is None:
            return super()._run_blocks(h, layer_states, lengths, inplace)
        # No state: the meta tokens lead the sequence (the training path), then are dropped.
        M = self.num_prefix
        meta = self.meta_embedding.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        lengths = None if lengths is None else lengths + M
        out, states = super()._run_blocks(torch.cat([meta, h], 1), None, lengths, inplace)
        return out[:, M:], states

    def init_state(self, batch_size: int = 1, *, device=None, dtype=None, max_len=None) -> ModelState:
        """The state after the meta tokens (``pos`` = 0): it depends only on the parameters.

        Computed on every call (the ``M`` meta tokens through the blocks: the one-call step plan where
        it applies, else the blocks' forward; the same values), never cached, so it always
        follows the current parameters, however they were written; a stream builds it once and
        ``step(reset=...)`` only when some row restarts (from 5 streams, in place, inside the step's
        own call: :meth:`_restart_in_step`)."""
        zero = super().init_state(batch_size, device=device, dtype=dtype, max_len=max_len)
        if self.meta_embedding is None:
            return zero
        if batch_size == 1:  # a reset's fresh row: the prefill writes the zero state's own buffers
            return ModelState(self._prefill_meta(zero), zero.pos)
        one = self._prefill_meta(super().init_state(1, device=zero.pos.device, max_len=max_len))
        layers = pytree.tree_map(
            lambda t, z: t.expand(batch_size, *t.shape[1:]).to(z.dtype, copy=True).contiguous(),
            one, zero.layers,
        )
        return ModelState(layers, zero.pos)

    def _restart_in_step(self, x_t: Tensor, state: ModelState, done: Tensor):
        """A many-streams step whose restarted rows get their fresh state inside the same C++ call:
        the M meta tokens ride along with the step's B rows through every block (each weight read
        once for both, not once more by a separate prefill; ``csrc/step/prefill.h``), computed from
        the current parameters on every call as :meth:`init_state` is. None where that does not
        apply (the step then resets the rows first): no meta tokens, a batch below
        RESTART_IN_STEP_MIN_BATCH, no row restarting, or no plan."""
        if (
            self.meta_embedding is None
            or x_t.shape[0] < RESTART_IN_STEP_MIN_BATCH
            or done.device.type != "cpu"
            or not self.use_fused_step
            or not streaming.fused_step_available()
            or not bool(done.any())
        ):
            return None
        meta = self.meta_embedding.to(self._compute_dtype())
        return streaming.fused_step(self, x_t, state, True, restart=(meta, done.contiguous()))

    def _prefill_meta(self, zero: ModelState) -> tuple:
        """The layer states after the meta tokens, from ``zero`` (a zero state of batch 1)."""
        meta = self.meta_embedding.to(device=zero.pos.device, dtype=self._compute_dtype()).unsqueeze(0)
        # the fused step where it applies (in place): every stream's reset runs this, and the M
        # frames through the one-call plan cost a fraction of the blocks' forward (dozens of small
        # ops per layer); the plan reads each weight once for the M frames (csrc/step/prefill.h),
        # about what one batch-1 step reads
        if streaming.prefill_blocks(self, meta, zero):
            return tuple(zero.layers)
        _, layers = super()._run_blocks(meta, zero.layers, None, False)
        # contiguous buffers (a conv window is a slice of the chunk), as every state a stream steps
        return tuple(pytree.tree_map(lambda t: t.contiguous(), layers))
