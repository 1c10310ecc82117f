"""Blocks: a residual block around one mixer, and a parallel block fusing two mixers.

A block is ``x + mixer(norm(x))``, then ``x + ffn(norm(x))`` where the model's reference has an
FFN. With ``pre_norm=False`` the norms come after the residual adds (post-norm). Mixers, the FFN and
the fusion are passed in; nothing is switched on by type inside ``forward``.

``compute_dtype`` (the model's ``residual_in_fp32``): the stream ``x`` arrives wider (fp32) than
the dtype the sublayers compute in; their inputs are cast to ``compute_dtype`` and their outputs are
added to the wide stream, which stays wide. None (default): everything in ``x``'s dtype.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from hybridssm.layers import FFN, LayerNorm, RMSNorm, make_norm
from hybridssm.mixers.base import check_mixer_state, finish_state
from hybridssm.ops.step import BlockStep, FFNStep, FusionStep, MixerStep, NormStep

__all__ = ["ResidualBlock", "ParallelBlock", "ParallelState", "GateFusion", "MeanFusion"]


def _accepts_inplace(mixer: nn.Module) -> bool:
    try:
        return "inplace" in inspect.signature(mixer.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def _lower(h: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """A sublayer's input in the dtype it computes in (``residual_in_fp32``: below the stream's)."""
    return h if compute_dtype is None else h.to(compute_dtype)


def call_mixer(
    mixer: nn.Module, accepts_inplace: bool, x: Tensor, state: Any, lengths, inplace: bool
) -> tuple[Tensor, Any]:
    """Call a mixer; a custom one without ``inplace`` gets its new state copied back instead."""
    if accepts_inplace:
        return mixer(x, state, lengths=lengths, inplace=inplace)
    y, new = mixer(x, state, lengths=lengths)
    return y, finish_state(state, new, inplace)


class _FFNSublayer(nn.Module):
    def __init__(
        self, ffn: nn.Module, dim: int, pre_norm: bool, dropout: float = 0.0,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm, self.ffn, self.pre_norm = norm if norm is not None else LayerNorm(dim), ffn, pre_norm
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _drop(self, y: Tensor) -> Tensor:
        return self.dropout(y) if self.dropout is not None else y

    def forward(self, x: Tensor, compute_dtype: torch.dtype | None = None) -> Tensor:
        if self.pre_norm:
            return x + self._drop(self.ffn(_lower(self.norm(x), compute_dtype)))
        return self.norm(x + self._drop(self.ffn(_lower(x, compute_dtype))))

    def step_spec(self) -> FFNStep | None:
        """The fused form of a :class:`~hybridssm.layers.FFN` (any of its activations) behind a known
        norm, else None."""
        norm, f = norm_step(self.norm), self.ffn
        if norm is None or type(f) is not FFN or type(f.up) is not nn.Linear or type(f.down) is not nn.Linear:
            return None
        gate = f.gate
        if gate is not None and type(gate) is not nn.Linear:
            return None
        return FFNStep(
            norm, f.up.weight, f.up.bias, f.down.weight, f.down.bias, f.activation,
            None if gate is None else gate.weight, None if gate is None else gate.bias,
        )


def norm_step(norm: nn.Module) -> NormStep | None:
    """The fused form of a norm module (LayerNorm, RMSNorm or Identity), else None."""
    kind = type(norm)
    if kind is LayerNorm:
        return NormStep("layer", norm.weight, norm.bias, float(norm.eps))
    if kind is RMSNorm:
        return NormStep("rms", norm.weight, None, float(norm.eps))
    if kind is nn.Identity:
        return NormStep("identity")
    return None


def _mixer_step(mixer: nn.Module) -> MixerStep | None:
    fn = getattr(mixer, "step_spec", None)
    return fn() if fn is not None else None


class ResidualBlock(nn.Module):
    """``x + drop(mixer(norm(x)))`` (+ ``x + drop(ffn(norm(x)))`` when ``ffn`` is given).

    Args:
        mixer, dim: the sequence mixer and the stream width.
        ffn: the position-wise network of the second sublayer, or None.
        pre_norm: norms before the sublayers (True) or after the residual adds (False).
        dropout: applied to the mixer's and the FFN's outputs before each residual add (the seed
            hybrid's layers); 0 adds no module.
        norm: ``"layernorm"`` or ``"rmsnorm"``; ``norm_eps`` its epsilon (None: the norm's default).

    ``forward(x, state, *, lengths, inplace, compute_dtype)``: see the module docstring for
    ``compute_dtype``.
    """

    def __init__(
        self, mixer: nn.Module, dim: int, *, ffn: nn.Module | None = None, pre_norm: bool = True,
        dropout: float = 0.0, norm: str = "layernorm", norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        # A mixer that normalises its own input (RWKV's layer holds both of its norms, since its
        # channel-mix needs the raw stream) gets no second pre-norm.
        owns_norm = pre_norm and getattr(mixer, "owns_norm", False)
        self.norm = nn.Identity() if owns_norm else make_norm(norm, dim, norm_eps)
        self.mixer = mixer
        self.pre_norm = pre_norm
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.ffn = (
            _FFNSublayer(ffn, dim, pre_norm, dropout, make_norm(norm, dim, norm_eps))
            if ffn is not None else None
        )
        self._inplace_ok = _accepts_inplace(mixer)

    def forward(
        self, x: Tensor, state: Any = None, *, lengths: Tensor | None = None, inplace: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Any]:
        h = _lower(self.norm(x) if self.pre_norm else x, compute_dtype)
        y, state = call_mixer(self.mixer, self._inplace_ok, h, state, lengths, inplace)
        if self.dropout is not None:
            y = self.dropout(y)
        x = x + y if self.pre_norm else self.norm(x + y)
        if self.ffn is not None:
            x = self.ffn(x, compute_dtype)
        return x, state

    def init_state(self, batch_size: int, **kw: Any) -> Any:
        return self.mixer.init_state(batch_size, **kw)

    def check_state(self, state: Any, batch_size: int, where: str) -> None:
        check_mixer_state(self.mixer, state, batch_size, where)

    def step_spec(self) -> BlockStep | None:
        """This block in a fused model step (:mod:`hybridssm.streaming`), or None when its mixer,
        norm or FFN has no fused form."""
        mixer = _mixer_step(self.mixer)
        norm = norm_step(self.norm)
        ffn = self.ffn.step_spec() if self.ffn is not None else None
        if mixer is None or norm is None or (self.ffn is not None and ffn is None):
            return None
        return BlockStep(self.pre_norm, norm, (mixer,), None, ffn)

    def state_max_len(self, state: Any) -> int | None:
        fn = getattr(self.mixer, "state_max_len", None)
        return fn(state) if fn is not None else None


class ParallelState(NamedTuple):
    ssm: Any
    attn: Any


class GateFusion(nn.Module):
    """The seeds' fusion: ``g * ssm + (1 - g) * attn`` with ``g = sigmoid(W h + b)`` per channel,
    ``h [B, T, d]`` the block's normed input; ``ssm, attn [B, T, d]`` the two paths' outputs.

    With ``normalize=True`` each path is first RMS-normalised with its own learnable per-channel
    gain (initialised to 1): ``g * norm_s(ssm) + (1 - g) * norm_a(attn)``. This is the per-path
    normalisation and re-scaling of Hymba (Dong et al. 2024, the fusion ``beta_1 * norm(attn) +
    beta_2 * norm(ssm)``), which the paper adds because the two kinds of heads produce outputs of
    very different magnitudes. Without it the fused output is dominated by the larger path, so a
    useful but small path stays invisible (the README's demo section has the measured magnitudes and
    accuracies).
    """

    def __init__(self, dim: int, *, normalize: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, dim)
        self.normalize = normalize
        if normalize:
            self.ssm_norm, self.attn_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, h: Tensor, ssm: Tensor, attn: Tensor) -> Tensor:
        if self.normalize:
            ssm, attn = self.ssm_norm(ssm), self.attn_norm(attn)
        g = torch.sigmoid(self.gate(h))
        return g * ssm + (1.0 - g) * attn

    def step_spec(self) -> FusionStep | None:
        """This fusion in a fused model step."""
        norms = _path_norms(self)
        if type(self.gate) is not nn.Linear or norms is None:
            return None
        return FusionStep("gate", self.gate.weight, self.gate.bias, *norms)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class MeanFusion(nn.Module):
    """Hymba's fusion: ``(norm_a(attn) + norm_s(ssm)) / 2`` with learnable per-channel norm gains
    (the paper's betas). ``normalize=False`` gives the plain ``(attn + ssm) / 2`` (an ablation)."""

    def __init__(self, dim: int, *, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        if normalize:
            self.attn_norm, self.ssm_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, h: Tensor, ssm: Tensor, attn: Tensor) -> Tensor:
        if self.normalize:
            ssm, attn = self.ssm_norm(ssm), self.attn_norm(attn)
        return 0.5 * (attn + ssm)

    def step_spec(self) -> FusionStep | None:
        """This fusion in a fused model step."""
        norms = _path_norms(self)
        return None if norms is None else FusionStep("mean", None, None, *norms)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


def _path_norms(fusion: nn.Module) -> tuple[NormStep | None, NormStep | None] | None:
    """``(ssm, attn)`` path norms, ``(None, None)`` without normalisation; None when a path norm is
    not an RMSNorm (the fused fusion normalises with RMSNorm only)."""
    if not fusion.normalize:
        return None, None
    norms = norm_step(fusion.ssm_norm), norm_step(fusion.attn_norm)
    return norms if all(n is not None and n.kind == "rms" for n in norms) else None


FUSIONS = {"gate": GateFusion, "mean": MeanFusion}


class ParallelBlock(nn.Module):
    """Two mixers on the same normed input, fused, with a residual, then a pre-norm FFN."""

    def __init__(
        self,
        ssm: nn.Module,
        attn: nn.Module,
        dim: int,
        *,
        fusion: nn.Module,
        ffn: nn.Module | None = None,
        pre_norm: bool = True,
        norm: str = "layernorm",
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, norm_eps)
        self.ssm, self.attn, self.fusion = ssm, attn, fusion
        self.pre_norm = pre_norm
        self.ffn = (
            _FFNSublayer(ffn, dim, pre_norm, norm=make_norm(norm, dim, norm_eps))
            if ffn is not None else None
        )
        self._inplace_ok = (_accepts_inplace(ssm), _accepts_inplace(attn))

    def forward(
        self, x: Tensor, state: ParallelState | None = None, *, lengths=None, inplace: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, ParallelState]:
        h = _lower(self.norm(x) if self.pre_norm else x, compute_dtype)
        s_state, a_state = (None, None) if state is None else state
        ys, s_state = call_mixer(self.ssm, self._inplace_ok[0], h, s_state, lengths, inplace)
        ya, a_state = call_mixer(self.attn, self._inplace_ok[1], h, a_state, lengths, inplace)
        y = self.fusion(h, ys, ya)
        x = x + y if self.pre_norm else self.norm(x + y)
        if self.ffn is not None:
            x = self.ffn(x, compute_dtype)
        if inplace and state is not None and s_state is state.ssm and a_state is state.attn:
            return x, state  # the mixers wrote into the given buffers: no new container
        return x, ParallelState(s_state, a_state)

    def step_spec(self) -> BlockStep | None:
        """This block in a fused model step (:mod:`hybridssm.streaming`), or None when a mixer, the
        fusion, a norm or the FFN has no fused form."""
        mixers = (_mixer_step(self.ssm), _mixer_step(self.attn))
        fn = getattr(self.fusion, "step_spec", None)
        fusion = fn() if fn is not None else None
        norm = norm_step(self.norm)
        ffn = self.ffn.step_spec() if self.ffn is not None else None
        if None in mixers or fusion is None or norm is None or (self.ffn is not None and ffn is None):
            return None
        return BlockStep(self.pre_norm, norm, mixers, fusion, ffn)

    def init_state(self, batch_size: int, **kw: Any) -> ParallelState:
        return ParallelState(
            self.ssm.init_state(batch_size, **kw), self.attn.init_state(batch_size, **kw)
        )

    def check_state(self, state: Any, batch_size: int, where: str) -> None:
        if not isinstance(state, ParallelState):
            raise ValueError(
                f"{where}: expected a ParallelState, got {type(state).__name__} "
                "(a state from another model?)"
            )
        check_mixer_state(self.ssm, state.ssm, batch_size, f"{where}.ssm")
        check_mixer_state(self.attn, state.attn, batch_size, f"{where}.attn")

    def state_max_len(self, state: ParallelState) -> int | None:
        for mixer, s in ((self.attn, state.attn), (self.ssm, state.ssm)):
            fn = getattr(mixer, "state_max_len", None)
            cap = fn(s) if fn is not None else None
            if cap is not None:
                return cap
        return None
