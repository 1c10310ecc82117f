"""The skeleton every model shares: input projection -> blocks -> final norm -> last timestep.

A model subclass only says which blocks it stacks (:meth:`SequenceModel.build_blocks`); the
forward, the streaming ``step``, states, padding, checkpointing and save/load live here; the checks
of inputs and states in :mod:`hybridssm.models.checks`.
The step's one-call fast path (a C++ plan of the whole model) lives in :mod:`hybridssm.streaming`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hybridssm import io as hsio
from hybridssm import streaming
from hybridssm.config import ModelConfig
from hybridssm.layers import is_fp32_no_decay, make_norm
from hybridssm.mixers.base import valid_mask
from hybridssm.models.checks import ModelChecks, _compiling
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._kernels import FORCED_BLOCKS
from hybridssm.state import ModelState
from hybridssm.streaming.plan import BOUND_KEY, GENERATION

__all__ = ["SequenceModel"]


class SequenceModel(ModelChecks, nn.Module):
    """Maps ``x [B, T, embed_dim]`` to ``[B, hidden_size]`` (the last timestep) or, with
    ``return_sequence=True``, to ``[B, T, hidden_size]``; streams with ``init_state`` + ``step``.

    Subclasses set ``config_class`` (through :func:`hybridssm.registry.register_model`) and
    implement :meth:`build_blocks`. Dropout (``config.dropout``) applies to the residual stream
    between blocks, as in the seeds' Mamba, GatedSSM, Hymba and SSTransformer; a model whose blocks
    drop inside (``hybrid``, as its seed: each mixer's and FFN's output before the residual add) sets
    ``dropout_between_blocks = False``. ``checkpoint_every=N`` recomputes each segment of N blocks in
    the backward pass.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    model_name: ClassVar[str] = ""
    #: whether :meth:`step` may run the whole step as one fused C++ call where the model's structure
    #: allows it (:mod:`hybridssm.streaming`); False keeps the block-by-block path (same values; for
    #: comparisons)
    use_fused_step: bool = True
    #: whether ``config.dropout`` applies between blocks (False: the blocks apply it themselves)
    dropout_between_blocks: ClassVar[bool] = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        d = config.hidden_size
        # The seeds project the input only when its width differs from the hidden size.
        self.input_proj = (
            nn.Linear(config.embed_dim, d) if config.embed_dim != d else nn.Identity()
        )
        self.positional = self.build_positional(config)
        self.blocks = nn.ModuleList(self.build_blocks(config))
        self.final_norm = make_norm(config.norm, d, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout if self.dropout_between_blocks else 0.0)

    def build_blocks(self, config: ModelConfig) -> list[nn.Module]:  # pragma: no cover
        raise NotImplementedError

    def build_positional(self, config: ModelConfig) -> nn.Module | None:
        """An additive position encoding ``pe(h [B, T, d], start [B]) -> h`` applied after the input
        projection (``start`` = each row's input position), or None (the default)."""
        return None

    def _embed(self, x: Tensor, start: Tensor | None) -> Tensor:
        h = self.input_proj(x)
        if self.positional is not None:
            if start is None:
                start = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            h = self.positional(h, start)
        return h

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def output_size(self) -> int:
        """Width of the output features (always ``hidden_size``)."""
        return self.config.hidden_size

    def _ref_param(self) -> Tensor:
        return self.final_norm.weight

    # -- dtype casts keep the marked parameters at least fp32 ------------------------------------
    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - nn.Module hook
        super()._apply(fn, recurse)
        self._clear_step_memos()
        streaming.forget(self)  # the parameters may have new storage, dtype or device
        for p in self.parameters():
            if is_fp32_no_decay(p) and p.is_floating_point():
                wide = acc_dtype(p.dtype)
                if p.dtype != wide:
                    p.data = p.data.to(wide)
        return self

    # -- states ---------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
    ) -> ModelState:
        """The state before the first input (``batch_size`` 1 by default, as the seed's
        ``init_cache``). Device and dtype follow the parameters unless given;
        ``max_len`` is the capacity of full-attention caches (input positions, default 4096)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_len is not None and (
            isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1
        ):
            raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
        p = self._ref_param()
        device = torch.device(device) if device is not None else p.device
        want = self._compute_dtype()
        if dtype is not None and dtype != want:
            # every field's dtype follows the parameters (recurrences in the wider of fp32 and
            # theirs); a state in another dtype would be refused by forward and step
            raise ValueError(
                f"dtype: a state's dtype follows the model's parameters ({want}), got {dtype}; "
                f"cast the model instead (model.to({dtype}))"
            )
        dtype = want
        layers = tuple(
            b.init_state(batch_size, device=device, dtype=dtype, max_len=max_len)
            for b in self.blocks
        )
        return ModelState(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    def _compute_dtype(self) -> torch.dtype:
        return self._dtype_tensor().dtype

    def _dtype_tensor(self) -> Tensor:
        """The parameter whose dtype the model computes in: the first non-marked one."""
        # its name is found once: walking every parameter on each step costs more than a small step
        path = self.__dict__.get("_dtype_param")
        if path is None:
            name = next((n for n, p in self.named_parameters() if not is_fp32_no_decay(p)), "")
            path = self.__dict__["_dtype_param"] = tuple(name.split(".")) if name else ()
        if not path:
            return self._ref_param()
        # the parameter is looked up each time (it may be replaced), through the module dicts, which
        # costs a fraction of get_parameter's attribute walk
        mod = self
        try:
            for part in path[:-1]:
                mod = mod._modules[part]
            return mod._parameters[path[-1]]
        except (KeyError, AttributeError):
            return self.get_parameter(".".join(path))

    def state_max_len(self, state: ModelState) -> int | None:
        """The attention capacity a state was built with (None when it has no full attention)."""
        for block, s in zip(self.blocks, state.layers):
            cap = block.state_max_len(s) if hasattr(block, "state_max_len") else None
            if cap is not None:
                return cap
        return None

    def _restart_in_step(self, x_t: Tensor, state: ModelState, done: Tensor):
        """An in-place step whose rows where ``done`` restart from :meth:`init_state` within the
        step itself, ``(y, state)``, or None: the step then calls :meth:`reset_rows` first (here
        always; Hymba overrides it)."""
        return None

    def reset_rows(self, state: ModelState, done: Tensor, inplace: bool = False) -> ModelState:
        """Rows where ``done`` is True restart from :meth:`init_state`.

        In eager mode only those rows are written, so a reset costs what the restarted rows hold,
        not the whole batch's buffers (many streams with full attention caches); nothing happens
        when no row restarts. In place on the CPU, one fresh row (``init_state(1)``) is copied into
        every restarted row of every tensor in one C++ call (:func:`hybridssm.streaming.fill_rows`);
        otherwise an ``init_state`` of their count is copied into their slots, tensor by tensor.
        Compiled graphs select every row with ``torch.where`` (no data-dependent shapes)."""
        cap = self.state_max_len(state)
        if not _compiling():
            if inplace and done.device.type == "cpu":
                # the streaming path: one fresh row, copied into every restarted row of every
                # tensor in one call (a Python write per tensor cost more than the rows themselves)
                if not bool(done.any()):
                    return state
                one = self.init_state(1, device=state.pos.device, max_len=cap)
                if streaming.fill_rows(state, one, done.contiguous()):
                    return state
            rows = done.nonzero().squeeze(1)
            if rows.numel() == 0:
                return state
            fresh = self.init_state(rows.numel(), device=state.pos.device, max_len=cap)

            def put(cur: Tensor, new: Tensor) -> Tensor:
                new = new.to(cur.dtype)
                return cur.index_copy_(0, rows, new) if inplace else cur.index_copy(0, rows, new)

            return torch.utils._pytree.tree_map(put, state, fresh)
        fresh = self.init_state(state.batch_size, device=state.pos.device, max_len=cap)

        def pick(cur: Tensor, new: Tensor) -> Tensor:
            m = done.view(-1, *([1] * (cur.dim() - 1)))
            out = torch.where(m, new.to(cur.dtype), cur)
            return cur.copy_(out) if inplace else out

        return torch.utils._pytree.tree_map(pick, state, fresh)

    # -- running --------------------------------------------------------------------------------
    def _run_blocks(
        self, h: Tensor, layer_states: tuple | None, lengths: Tensor | None, inplace: bool
    ) -> tuple[Tensor, list]:
        """Run every block; returns the features (fp32 with ``residual_in_fp32`` in a lower
        precision) and the list of new layer states."""
        n = len(self.blocks)
        states = list(layer_states) if layer_states is not None else [None] * n
        seg = self.config.checkpoint_every
        use_ckpt = seg > 0 and self.training and torch.is_grad_enabled()
        # residual_in_fp32: the stream widens to fp32 here and stays so (the caller's final norm
        # reads it); the blocks' sublayers compute in the dtype it came in. A no-op in fp32/fp64,
        # where no block gets the keyword (custom blocks without it keep working there).
        kw: dict[str, Any] = {}
        if self.config.residual_in_fp32:
            wide = acc_dtype(h.dtype)
            if wide != h.dtype:
                kw, h = {"compute_dtype": h.dtype}, h.to(wide)

        def run(i0: int, i1: int, h: Tensor, *sts: Any) -> tuple[Tensor, list]:
            out = []
            for i in range(i0, i1):
                h, s = self.blocks[i](h, sts[i - i0], lengths=lengths, inplace=inplace, **kw)
                if i < n - 1:
                    h = self.dropout(h)
                out.append(s)
            return h, out

        if not use_ckpt:
            return run(0, n, h, *states)
        new_states: list = []
        for i0 in range(0, n, seg):
            i1 = min(n, i0 + seg)
            h, out = checkpoint(run, i0, i1, h, *states[i0:i1], use_reentrant=False)
            new_states.extend(out)
        return h, new_states

    def forward(
        self,
        x: Tensor,
        state: ModelState | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
        return_sequence: bool = False,
        return_state: bool = False,
        max_len: int | None = None,
    ) -> Tensor | tuple[Tensor, ModelState]:
        """Run a sequence (or a chunk of one, from ``state``).

        Args:
            x: ``[B, T, embed_dim]``, any ``T >= 1``.
            state: continue from this state (chunked prefill, truncated BPTT); never modified.
            lengths: ``[B]`` ints in ``1..T`` for a right-padded batch: each row's output is taken
                at its own last valid step, padded positions of a returned sequence are zeros, and
                the returned state is each row's state after its own last valid step.
            return_sequence: return ``[B, T, hidden_size]`` instead of the last timestep.
            return_state: also return the state after the last (valid) step.
            max_len: capacity of full-attention caches when a state is started here.
        """
        x = self._check_input(x, "x")
        B, T, _ = x.shape
        lengths = self._check_lengths(lengths, B, T, x.device)
        if state is not None:
            self._check_state(state, B)
        elif return_state:
            state = self.init_state(B, device=x.device, max_len=max_len)
        if lengths is not None:
            # padding never reaches valid results, whatever it holds: a NaN or Inf there would
            # otherwise pass through products with zero weights (attention over masked keys, a
            # scan's skipped steps), since 0 * NaN is NaN
            pad = ~valid_mask(lengths, T, x.device)
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        h = self._embed(x, None if state is None else state.pos)
        low = h.dtype  # the output's (the stream may run wider: residual_in_fp32)
        h, layers = self._run_blocks(h, None if state is None else state.layers, lengths, False)
        h = self.final_norm(h).to(low)
        if return_sequence:
            mask = valid_mask(lengths, T, x.device)
            out = h if mask is None else h * mask.unsqueeze(-1).to(h.dtype)
        elif lengths is None:
            out = h[:, -1]
        else:
            idx = (lengths - 1).view(B, 1, 1).expand(B, 1, h.shape[-1])
            out = h.gather(1, idx).squeeze(1)
        if not return_state:
            return out
        pos = state.pos + (lengths if lengths is not None else T)
        # contiguous buffers (a conv window is a slice of the chunk): the state a stream then steps
        # in place, which the fused step writes through its buffers' memory (a no-op when they are)
        layers = torch.utils._pytree.tree_map(
            lambda t: t.contiguous() if isinstance(t, Tensor) else t, tuple(layers)
        )
        return out, ModelState(layers, pos)

    def step(
        self,
        x_t: Tensor,
        state: ModelState,
        *,
        reset: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, ModelState]:
        """One frame: ``x_t [B, embed_dim]`` or ``[B, 1, embed_dim]`` -> ``([B, hidden], state)``.

        ``reset [B]`` bool restarts those rows from :meth:`init_state` before the frame.
        ``inplace=True`` writes the new state into ``state``'s buffers (the streaming fast path);
        otherwise ``state`` is left unchanged. Equals ``forward`` on the whole stream.
        """
        compiling = _compiling()
        if not compiling and inplace and reset is None:
            # A stream steps the state the previous step bound (hybridssm.streaming.plan.Bound): its
            # checks passed then; what may have changed since is checked here (the plan's generation,
            # use_kernels blocks, use_fused_step, train mode) and in the call (the frame, gradient
            # mode, autocast, the model's dtype, the cache's room), which returns None where the
            # path below must run (its checks raise the errors). At batch 1 each Python call here
            # costs cache misses (the step streams the weights through the caches), hence no calls.
            bound = self.__dict__.get(BOUND_KEY)
            if (
                bound is not None
                and bound.state is state
                and bound.generation == GENERATION[0]
                and not FORCED_BLOCKS[0]
                and type(x_t) is Tensor
                and self.use_fused_step
                and not self.training
            ):
                y = bound.run(x_t)
                if y is not None:
                    return y, state
        if compiling or not self._frame_known(x_t):
            self._check_frame(x_t)
        B = x_t.shape[0]
        # A stream passes back the state the previous step returned: that one was checked (or built
        # from checked buffers) already. The memo holds that one state (which the caller holds too).
        memo = None if compiling else self.__dict__.get("_state_ok")
        if memo is None or memo[0] is not state or memo[1] != B:
            self._check_state(state, B)
            cap = None if compiling else self.state_max_len(state)
        else:
            cap = memo[2]
        if reset is not None:
            if not isinstance(reset, Tensor):
                raise TypeError(f"reset must be a bool tensor [batch], got {type(reset).__name__}")
            if reset.dtype != torch.bool or tuple(reset.shape) != (B,):
                raise ValueError(
                    f"reset: expected a bool tensor of shape ({B},), got {reset.dtype} "
                    f"{tuple(reset.shape)}"
                )
            reset = reset.to(state.pos.device)
        if not compiling:
            # before anything is written: a refused step leaves every layer as it was
            self._check_step_capacity(cap, state.pos, reset)
        out = None
        if reset is not None:
            # a model may restart the rows inside its step (Hymba: the meta tokens ride along)
            out = None if compiling or not inplace else self._restart_in_step(x_t, state, reset)
            if out is None:
                fresh = self.reset_rows(state, reset, inplace)
                state = state if inplace else fresh  # inplace: the same buffers, rewritten
        if out is None and self.use_fused_step and not compiling and streaming.fused_step_available():
            out = streaming.fused_step(self, x_t, state, inplace)
        if out is None:
            x = x_t if x_t.dim() == 3 else x_t.unsqueeze(1)
            h = self._embed(x, state.pos)
            low = h.dtype
            h, layers = self._run_blocks(h, state.layers, None, inplace)
            h = self.final_norm(h)[:, 0].to(low)
            if inplace:
                state.pos.add_(1)
                # the blocks wrote into the given buffers: hand back the same state (no rebuild)
                if not all(n is o for n, o in zip(layers, state.layers)):
                    state = ModelState(tuple(layers), state.pos)
                out = h, state
            else:
                out = h, ModelState(tuple(layers), state.pos + 1)
        if not compiling:
            self.__dict__["_state_ok"] = (out[1], B, cap)
        return out

    # -- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` (model name, dtype, options) and ``model.safetensors`` into the
        directory ``path``, each atomically; :func:`hybridssm.load` reads them back (in eval mode).
        See :mod:`hybridssm.io`."""
        return hsio.save_pretrained(self, path)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: marked parameters (SSM decays, ``D``, norms) and biases get no decay."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if is_fp32_no_decay(p) or name.endswith("bias") else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
