"""A model's streaming step in one C++ call.

:class:`StepPlan` walks a model once (input projection, every block's :meth:`step_spec`, the final
norm) and builds the C++ plan of ``ops/csrc/step/plan.h``, which holds the parameters themselves
and calls each mixer's kernel by its kind. ``SequenceModel.step`` runs it when it applies
(:func:`fused_step`); otherwise (and always under ``torch.compile``, and with
``model.use_fused_step = False``) the block-by-block Python step runs, with the same values.

Nothing goes stale: the plan keeps no value derived from a parameter (kernels compute, e.g.,
``-exp(A_log)`` on every call), and the tensors it holds share the parameters' storage handles, so
``p.data = ...``, ``p.data.copy_(...)``, ``load_state_dict``, optimizer steps and in-place casts are
seen by the next step. A plan is rebuilt when the model's structure may have changed: after
``model.to(...)`` / ``.double()`` (``_apply``) and after any module registers a parameter, buffer or
submodule (a global generation counter fed by torch's registration hooks: a replaced Parameter or
mixer, ``load_state_dict(assign=True)``).

The plan applies on CPU, to fp32 or fp64 models whose step parameters share one dtype, for inputs
and states in that dtype, without autocast, when no gradient is needed (under ``no_grad`` /
``inference_mode``, or parameters that do not require grad), with dropout inactive (``eval()`` or
p = 0), when every block and mixer has a fused form whose kernel is in the built extension, and
the kernel backend is ``auto`` or ``fused`` (:func:`hybridssm.ops.use_kernels`).

A stream's in-place steps of one state take a shorter path: the second binds the state to the plan
(:class:`Bound`, ``csrc/step/bound.h``: the state's tensors handed to C++ once), and the next ones
are a few attribute reads in ``SequenceModel.step`` and one call, which checks in C++ what the
path above checks in Python (and the capacity of full-attention caches) and declines, writing
nothing, wherever that path must run instead. Measured at batch 1 (the Python around the C++ run,
median per step, 1 thread): ss_transformer 76-140 us -> 17-34, hymba 50-110 -> 11-24, transformer
39-77 -> 7-9, hybrid 29-62 -> 7-9, mamba 16-25 -> 3; the step 1.1-1.3x faster (A/B, both orders).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from hybridssm.blocks import ParallelState, norm_step
from hybridssm.ops import _kernels
from hybridssm.ops.step import (
    BlockStep,
    NormStep,
    fused_backend_selected,
    fused_step_available,
    fused_step_kinds,
    step_extension,
)
from hybridssm.state import ModelState

__all__ = ["BOUND_KEY", "StepPlan", "fused_step", "plan_status", "prefill_blocks"]

_NORM_KIND = {"identity": 0, "layer": 1, "rms": 2}
_FUSION_KIND = {None: 0, "gate": 1, "mean": 2}
_FFN_KIND = {"gelu": 0, "swiglu": 1, "geglu": 2}
_EMPTY = torch.empty(0)

# Bumped whenever any module registers a parameter, buffer or submodule: a plan built at an older
# generation is rebuilt before its next run (a replaced Parameter is a new tensor the plan lacks).
# Read as GENERATION[0] (one list, never rebound) by the step's fast path too.
_generation = GENERATION = [0]


def _bump(*_: Any) -> None:
    _generation[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_bump)
nn.modules.module.register_module_buffer_registration_hook(_bump)
nn.modules.module.register_module_module_registration_hook(_bump)


class _Refused(ValueError):
    """The model has no fused step (the message says why)."""


def _t(x: Tensor | None) -> Tensor:
    return _EMPTY if x is None else x


class StepPlan:
    """A model's whole step as one C++ call (see the module docstring).

    Build with ``StepPlan(model)`` (raises ``ValueError`` naming what has no fused form); run with
    :meth:`run`, which returns None where the plan does not apply to this call.
    """

    def __init__(self, model: nn.Module) -> None:
        kinds = set(fused_step_kinds())
        cpp = step_extension().Plan()
        tensors: list[Tensor] = []

        # An additive positional encoding (sinusoidal, learned, the seed's) is applied before the
        # call by the model's own embedding (input projection + encoding at each row's position:
        # the forward's ops); the C++ plan then starts at the blocks.
        self.embeds = getattr(model, "positional", None) is not None
        ip = model.input_proj
        if self.embeds:
            tensors += list(model.input_proj.parameters()) + list(model.positional.parameters())
        elif type(ip) is nn.Linear:
            cpp.set_input(ip.weight, _t(ip.bias))
            tensors += [ip.weight, *([ip.bias] if ip.bias is not None else [])]
        elif type(ip) is not nn.Identity:
            raise _Refused(f"input projection {type(ip).__name__}")

        for i, block in enumerate(model.blocks):
            fn = getattr(block, "step_spec", None)
            spec: BlockStep | None = fn() if fn is not None else None
            if spec is None:
                raise _Refused(f"block {i} ({type(block).__name__}) has no fused step")
            missing = [m.kind for m in spec.mixers if m.kind not in kinds]
            if missing:
                raise _Refused(f"block {i}: no fused kernel for mixer kind {missing[0]!r}")
            counts = [len(pytree.tree_leaves(s)) for s in _mixer_states(block)]
            tensors += _add_block(cpp, spec, counts)

        fin = norm_step(model.final_norm)
        if fin is None:
            raise _Refused(f"final norm {type(model.final_norm).__name__}")
        cpp.set_final_norm(_NORM_KIND[fin.kind], _t(fin.weight), _t(fin.bias), fin.eps)
        tensors += [t for t in (fin.weight, fin.bias) if t is not None]

        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise _Refused(f"parameters in {sorted(map(str, dtypes))} (one of float32, float64 needed)")
        if any(t.device.type != "cpu" for t in tensors):
            raise _Refused("parameters not on the CPU")
        self._cpp = cpp
        self.dtype: torch.dtype = next(iter(dtypes))
        self._params = tuple(tensors)
        self._dropouts = tuple(m for m in model.modules() if isinstance(m, nn.Dropout))
        self._memo: tuple[Any, list[Tensor] | None] | None = None  # (state, its leaves) of inplace runs
        self.restarts: bool = cpp.restarts()  # every mixer can restart rows inside a step (run's restart)

    def _grad_needed(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._params))

    def _leaves_ok(self, leaves: list[Tensor], contiguous: bool) -> bool:
        if len(leaves) != self._cpp.num_states():
            return False
        for t in leaves:
            if not isinstance(t, Tensor) or (contiguous and not t.is_contiguous()):
                return False
            if t.is_floating_point() and t.dtype is not self.dtype:
                return False
        return True

    def applies(self, x: Tensor, training: bool) -> bool:
        """Whether the plan may take a frame like ``x`` now (the module docstring's conditions on the
        input, autocast, gradients and dropout)."""
        return not (
            x.dtype is not self.dtype
            or x.device.type != "cpu"
            or (training and any(d.p > 0 for d in self._dropouts))
            or torch.is_autocast_enabled("cpu")
            or self._grad_needed(x)
        )

    def run(
        self, x: Tensor, state: ModelState, *, inplace: bool, training: bool,
        embed: Callable[[Tensor, Tensor], Tensor] | None = None,
        restart: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, ModelState] | None:
        """One frame through the plan: ``(y [B, d], state)``, or None where it does not apply (the
        caller then runs the block-by-block step). ``inplace`` writes into ``state``'s buffers (which
        must be contiguous), else they are copied first. A plan that :attr:`embeds` takes the
        model's ``embed(x [B, 1, E], start [B]) -> h [B, 1, d]`` (its input projection and
        positional encoding) and applies it before the call.

        ``restart = (tokens [T, hidden], done [B] bool)`` (in place only, where :attr:`restarts`):
        the rows where ``done`` is True first restart, in the same call, from the state after
        ``tokens`` (tokens that enter at the first block, such as Hymba's meta tokens) run from the
        zero state, at position 0; the tokens' products go with the step's (``csrc/step/plan.h``,
        ``prefill.h``). Values: the other rows' exactly those of the step without the restart, the
        restarted rows' state that of the tokens' prefill within float rounding (their products
        sum in another order than a lone row's)."""
        if not self.applies(x, training):
            return None
        if restart is not None and not (inplace and self.restarts):
            return None
        if self.embeds:
            if embed is None:
                return None
            start = state.pos if restart is None else state.pos.masked_fill(restart[1], 0)
            x = embed(x if x.dim() == 3 else x.unsqueeze(1), start)[:, 0].contiguous()
        if inplace:
            memo = self._memo
            if memo is None or memo[0] is not state:
                leaves = pytree.tree_leaves(state.layers)
                memo = self._memo = (state, leaves if self._leaves_ok(leaves, True) else None)
            if memo[1] is None:
                return None
            if restart is None:
                return self._cpp.run(x, memo[1], state.pos), state
            tokens, done = restart
            if tokens.dtype is not self.dtype:
                return None
            return self._cpp.run(x, memo[1], state.pos, tokens, done), state
        leaves, spec = pytree.tree_flatten(state.layers)
        if not self._leaves_ok(leaves, False):
            return None
        new = [t.clone(memory_format=torch.contiguous_format) for t in leaves]
        pos = state.pos.clone()
        y = self._cpp.run(x, new, pos)
        return y, ModelState(pytree.tree_unflatten(new, spec), pos)

    def prefill(self, h: Tensor, state: ModelState, *, training: bool) -> bool:
        """Run ``h [B, T, hidden]`` through the blocks from ``state``, in place (no input projection,
        no final norm; ``state.pos`` unchanged): the values of ``T`` steps, computed block by block
        (``csrc/step/plan.h``). False, with ``state`` untouched, where the plan does not apply."""
        if not self.applies(h, training):
            return False
        leaves = pytree.tree_leaves(state.layers)
        if not self._leaves_ok(leaves, True):
            return False
        self._cpp.prefill(h, leaves, state.pos.clone())  # these tokens are not input positions
        return True


_PLAN_RUN = StepPlan.run


def _mixer_states(block: nn.Module) -> list[Any]:
    """One small state per mixer of ``block`` (to count its tensors)."""
    s = block.init_state(1, max_len=1)
    return list(s) if isinstance(s, ParallelState) else [s]


def _add_block(cpp: Any, spec: BlockStep, counts: list[int]) -> list[Tensor]:
    """Hand one block to the C++ plan; returns the tensors it holds."""
    held: list[Tensor] = []

    def norm(n: NormStep | None) -> tuple[int, Tensor, Tensor, float]:
        if n is None:
            return 0, _EMPTY, _EMPTY, 0.0
        held.extend(t for t in (n.weight, n.bias) if t is not None)
        return _NORM_KIND[n.kind], _t(n.weight), _t(n.bias), n.eps

    nk, nw, nb, neps = norm(spec.norm)
    weights = []
    for m in spec.mixers:
        w = m.flat_weights()
        held.extend(t for t in w if t.numel())
        weights.append(w)
    fusion_w, fusion_eps = [], [0.0, 0.0]
    if spec.fusion is not None:
        f = spec.fusion
        sk, sw, _, seps = norm(f.ssm_norm)
        ak, aw, _, aeps = norm(f.attn_norm)
        held.extend(t for t in (f.gate_w, f.gate_b) if t is not None)
        fusion_w, fusion_eps = [_t(f.gate_w), _t(f.gate_b), sw, aw], [seps, aeps]
    ffn, fk, feps, form = [], 0, 0.0, 0
    if spec.ffn is not None:
        f = spec.ffn
        fk, fw, fb, feps = norm(f.norm)
        held.extend(t for t in (f.up_w, f.up_b, f.down_w, f.down_b, f.gate_w, f.gate_b) if t is not None)
        ffn = [fw, fb, f.up_w, _t(f.up_b), f.down_w, _t(f.down_b)]
        form = _FFN_KIND[f.activation]
        if f.gate_w is not None:
            ffn += [f.gate_w, _t(f.gate_b)]
    cpp.add_block(
        spec.pre_norm, nk, nw, nb, neps,
        [m.kind for m in spec.mixers], weights, [list(m.ints) for m in spec.mixers],
        [[float(v) for v in m.floats] for m in spec.mixers], counts,
        _FUSION_KIND[None if spec.fusion is None else spec.fusion.kind], fusion_w, fusion_eps,
        fk, ffn, feps, form,
    )
    return held


# The key of a model's bound step in its __dict__ (SequenceModel.step's fast path reads it there).
BOUND_KEY = "_bound_step"


class Bound:
    """A model's in-place step bound to one stream's state (``csrc/step/bound.h``): ``run(x)`` is the
    fused step of ``state`` in one call, or None where it does not apply. Valid while the model's plan
    is of :attr:`generation`; :meth:`SequenceModel.step` checks that, the state's identity and what
    else only Python sees. A copy or a pickle of the model carries none (``ModelChecks.__getstate__``):
    it binds its own at its first step."""

    __slots__ = ("state", "generation", "run")

    def __init__(self, state: ModelState, generation: int, run: Callable[[Tensor], Tensor | None]) -> None:
        self.state, self.generation, self.run = state, generation, run


def _bind(model: nn.Module, entry: _Entry, state: ModelState) -> None:
    """Remember ``model``'s in-place step of ``state`` (which its plan just ran) as one call. Not for
    a plan that embeds (the model's own embedding runs first, in Python) or whose :meth:`StepPlan.run`
    is replaced (a subclass, a wrapper: it must see every step)."""
    plan = entry.plan
    held = model.__dict__.get(BOUND_KEY)
    if held is not None and held.state is state and held.generation == entry.generation:
        return
    memo = plan._memo
    if plan.embeds or type(plan).run is not _PLAN_RUN:
        return
    if memo is None or memo[0] is not state or memo[1] is None:
        return
    cap = model.state_max_len(state)
    bound = step_extension().BoundStep(plan._cpp, memo[1], state.pos, model._dtype_tensor(),
                                       model.config.embed_dim, -1 if cap is None else cap)
    model.__dict__[BOUND_KEY] = Bound(state, entry.generation, bound.run)


class _Entry:
    __slots__ = ("generation", "plan", "reason")

    def __init__(self, generation: int, plan: StepPlan | None, reason: str) -> None:
        self.generation, self.plan, self.reason = generation, plan, reason


# model -> its plan (weakly: a plan never keeps a model alive, and copies / pickles never carry one)
_PLANS: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _entry(model: nn.Module) -> _Entry:
    entry = _PLANS.get(model)
    gen = _generation[0]
    if entry is None or entry.generation != gen:
        try:
            entry = _Entry(gen, StepPlan(model), "fused")
        except _Refused as exc:
            entry = _Entry(gen, None, str(exc))
        _PLANS[model] = entry
    return entry


def forget(model: nn.Module) -> None:
    """Drop ``model``'s plan (its parameters moved or changed dtype): the next step rebuilds it."""
    _PLANS.pop(model, None)
    model.__dict__.pop(BOUND_KEY, None)


def plan_status(model: nn.Module) -> str:
    """``"fused"`` when ``model``'s step runs as one call, else the reason it does not: the model's
    structure, or a kernel backend other than ``auto``/``fused`` (``HYBRIDSSM_KERNELS=torch`` or
    :func:`hybridssm.use_kernels`; then nothing is built to answer)."""
    if not fused_backend_selected():
        return (f"the kernel backend is {_kernels.current_backend()!r} (HYBRIDSSM_KERNELS or "
                "hs.use_kernels): the step runs block by block")
    return _entry(model).reason


def fused_step(
    model: nn.Module, x: Tensor, state: ModelState, inplace: bool,
    restart: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, ModelState] | None:
    """``model``'s step through its plan, or None where none applies (see the module docstring);
    ``restart`` as in :meth:`StepPlan.run`. A state stepped in place twice in a row is bound
    (:class:`Bound`): the model's next steps of it take one call. States stepped in turn (one model
    serving several states) are not: binding each step would cost more than the call saves."""
    entry = _entry(model)
    plan = entry.plan
    if plan is None:
        return None
    embed = model._embed if plan.embeds else None
    again = inplace and plan._memo is not None and plan._memo[0] is state
    out = plan.run(x, state, inplace=inplace, training=model.training, embed=embed, restart=restart)
    if out is not None and again:
        _bind(model, entry, state)
    return out


def prefill_blocks(model: nn.Module, h: Tensor, state: ModelState) -> bool:
    """Run tokens that enter at the first block, ``h [B, T, hidden]`` (such as Hymba's meta tokens,
    which join after the embedding), through ``model``'s blocks from ``state``, in place, through the
    plan: the values of the blocks' forward, as every step. ``state.pos`` stays as it is (these
    tokens are not input positions). Returns False, with ``state`` untouched, where
    no plan applies (also under ``torch.compile`` / export and with ``model.use_fused_step = False``):
    the caller then runs the blocks' forward."""
    if not getattr(model, "use_fused_step", True) or torch.compiler.is_compiling():
        return False
    if not fused_step_available():
        return False
    plan = _entry(model).plan
    return plan is not None and plan.prefill(h, state, training=model.training)
