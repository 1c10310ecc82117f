"""The checks every model runs on its inputs: frames, sequences, ``lengths``, states (structure,
shapes, dtypes) and a full-attention cache's capacity. Each error names the argument, the value and
what is allowed. :meth:`~hybridssm.models.base.SequenceModel.step` memoises what it checked (the kind
of frame, the state's layout) so that a stream pays for the full checks once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hybridssm.state import ModelState
from hybridssm.streaming.plan import BOUND_KEY

__all__ = ["ModelChecks"]

# what SequenceModel.step memoises in the model's __dict__ (the kinds of frames checked, the state
# checked last, the state bound to the plan: hybridssm.streaming.plan.Bound)
_STEP_MEMOS = ("_inputs_ok", "_state_ok", BOUND_KEY)


# torch's own function (not a wrapper around it): torch.compile folds it to True by identity, and in
# eager mode every call level costs, at batch 1, a few cache misses (the step streams its weights)
_compiling = torch.compiler.is_compiling


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4 signature
        return torch.is_autocast_enabled()


class ModelChecks:
    """The input and state checks of :class:`~hybridssm.models.base.SequenceModel` (a mixin: it reads
    the model's ``config``, ``blocks``, ``_ref_param()`` and ``_compute_dtype()``)."""

    def _clear_step_memos(self) -> None:
        """Forget the checks :meth:`step` memoised (the model's device or dtype may have changed)."""
        for key in _STEP_MEMOS:
            self.__dict__.pop(key, None)

    def __getstate__(self) -> dict[str, Any]:
        # a copy or a pickle carries no step memo: they hold the last stepped state (a pickle would
        # carry its buffers) and the bound step of the original's plan, which a copy must not run
        state = super().__getstate__()  # type: ignore[misc]  # nn.Module's
        for key in _STEP_MEMOS:
            state.pop(key, None)
        return state

    def _frame_known(self, x: Any) -> bool:
        """Whether a frame of ``x``'s kind (shape, dtype, device) passed :meth:`step`'s input check
        before, with the model in its current dtype. A stream sends the same kind of frame every
        call; the model's device and dtype changes go through ``_apply``, which clears the memo."""
        if type(x) is not Tensor:
            return False
        want = self._compute_dtype()
        known = self.__dict__.get("_inputs_ok")
        return known is not None and x.dtype is want and (x.shape, x.device, want) in known

    def _check_frame(self, x: Any) -> None:
        """:meth:`step`'s input check (in full), remembered for frames in the model's dtype."""
        self._check_input(x, "x_t", step=True)
        want = self._compute_dtype()
        if type(x) is Tensor and x.dtype is want:
            known = self.__dict__.setdefault("_inputs_ok", set())
            if len(known) > 64:
                known.clear()
            known.add((x.shape, x.device, want))

    def _check_input(self, x: Any, name: str, *, step: bool = False) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        E = self.config.embed_dim
        if step:
            if x.dim() == 3 and x.shape[1] != 1:
                raise ValueError(
                    f"{name}: step takes one frame, [batch, embed_dim] or [batch, 1, embed_dim]; "
                    f"got shape {tuple(x.shape)} (use forward(x, state=...) for a chunk)"
                )
            if x.dim() not in (2, 3):
                raise ValueError(
                    f"{name}: expected [batch, {E}] or [batch, 1, {E}], got shape {tuple(x.shape)}"
                )
            x = x if x.dim() == 3 else x.unsqueeze(1)
        elif x.dim() != 3:
            raise ValueError(
                f"{name}: expected a 3-D tensor [batch, seq, {E}], got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != E:
            raise ValueError(
                f"{name}: expected feature size embed_dim={E} in the last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name}: empty batch (shape {tuple(x.shape)})")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: empty sequence (shape {tuple(x.shape)}); need seq >= 1")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        p = self._ref_param()
        if x.device != p.device:
            raise ValueError(f"{name}: expected device {p.device} (the model's), got {x.device}")
        want = self._compute_dtype()
        if x.dtype != want and not _autocast_on(x.device.type):
            raise ValueError(
                f"{name}: expected dtype {want} (the model's), got {x.dtype}; cast the input "
                "or run under torch.autocast"
            )
        return x

    def _check_lengths(self, lengths: Any, B: int, T: int, device: torch.device) -> Tensor | None:
        if lengths is None:
            return None
        if isinstance(lengths, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
                raise ValueError(f"lengths: expected integers, got {list(lengths)!r}")
            lengths = torch.tensor(lengths, dtype=torch.long, device=device)
        elif not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be a tensor or a list of ints, got {type(lengths).__name__}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths: expected shape ({B},) (one per row), got {tuple(lengths.shape)}")
        lengths = lengths.to(device=device, dtype=torch.long)
        if not _compiling():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > T:
                raise ValueError(
                    f"lengths: values must be in 1..{T} (the sequence length), got min {lo}, max {hi}"
                )
        return lengths

    def _check_state(self, state: Any, B: int, name: str = "state") -> None:
        if not isinstance(state, ModelState):
            raise ValueError(
                f"{name}: expected a ModelState from init_state() or forward(return_state=True) "
                f"of this model, got {type(state).__name__}"
            )
        if not isinstance(state.layers, tuple):
            raise ValueError(
                f"{name}.layers: expected a tuple of layer states, got {type(state.layers).__name__}"
            )
        if len(state.layers) != len(self.blocks):
            raise ValueError(
                f"{name}: expected {len(self.blocks)} layer states (this model's num_layers), got "
                f"{len(state.layers)} (a state from another model?)"
            )
        if not isinstance(state.pos, Tensor) or tuple(state.pos.shape) != (B,):
            got = tuple(state.pos.shape) if isinstance(state.pos, Tensor) else type(state.pos)
            raise ValueError(f"{name}.pos: expected shape ({B},) for batch size {B}, got {got}")
        if _compiling():
            return
        for i, (block, s) in enumerate(zip(self.blocks, state.layers)):
            block.check_state(s, B, f"{name}.layers[{i}]")
        self._check_state_dtypes(state, name)

    def _check_state_dtypes(self, state: ModelState, name: str) -> None:
        """Every buffer in the dtype and on the device :meth:`init_state` gives it (the structure
        and shapes were checked by the blocks). The dtypes depend only on the model's dtype: they
        come from one meta-device state, remembered per dtype."""
        p = self._ref_param()
        want_dtype = self._compute_dtype()
        memo = self.__dict__.setdefault("_state_dtypes", {})
        if want_dtype not in memo:
            from hybridssm.models.base import SequenceModel  # the skeleton's state: no Hymba prefill

            ref = SequenceModel.init_state(self, 1, device="meta")
            memo[want_dtype] = list(_tensors(ref))
        for t, ref_t in zip(_tensors(state), memo[want_dtype]):
            if t.dtype != ref_t.dtype or t.device != p.device:
                # the slow path names the field
                paths = torch.utils._pytree.tree_flatten_with_path(state)[0]
                field = name + next(torch.utils._pytree.keystr(k) for k, v in paths if v is t)
                raise ValueError(
                    f"{field}: expected dtype {ref_t.dtype} on {p.device} (the model's: build states "
                    f"with init_state() after casting or moving the model), got {t.dtype} on {t.device}"
                )

    @staticmethod
    def _check_step_capacity(cap: int | None, pos: Tensor, reset: Tensor | None) -> None:
        """A step past a full-attention cache's ``max_len`` (``cap`` input positions) raises here,
        before any layer has been written (rows being reset start again from position 0)."""
        if cap is None:
            return
        if reset is not None:
            pos = pos.masked_fill(reset, 0)
        need = int(pos.max()) + 1
        if need > cap:
            raise ValueError(
                f"attention cache full: max_len={cap} input positions, but this step needs {need}; "
                "raise it with init_state(max_len=...) or forward(..., max_len=...), or use a sliding "
                "window (use_sliding_window=True / window_size) for an unbounded stream"
            )


def _tensors(tree: Any):
    """The tensors of a state (nested tuples and NamedTuples), in pytree order; faster than
    ``tree_leaves`` on the per-call check path."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, tuple):
        for item in tree:
            yield from _tensors(item)
