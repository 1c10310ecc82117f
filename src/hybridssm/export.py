"""Exporting a model for use without Python or without this package: ``torch.export`` programs of
the step and of the forward, an AOTInductor package of the step, and ONNX through either program.

Under export every op takes its PyTorch form (``ops/_kernels.py`` resolves to ``torch`` while
``torch.compiler.is_exporting()``), so the programs hold only core ATen ops: nothing of hybridssm
is needed to run them.

**The step package.** :func:`export_step` compiles the *functional* step at a fixed batch size
(and attention capacity ``max_len``) into one ``.pt2`` file. The state travels as a flat list of
tensors, its *leaves*, in ``torch.utils._pytree.tree_flatten(state)`` order (layer by layer, each
layer's NamedTuple fields in order, then ``pos``); the package is called as
``pkg(x_t, *leaves) -> (y_t, *new_leaves)``. Beside it, ``<path>.init.pt`` holds the leaves of
``init_state(batch_size)`` (a list of tensors), which starts a stream and resets rows::

    import torch, torch._inductor                      # no hybridssm needed
    pkg = torch._inductor.aoti_load_package("step.pt2")
    leaves = torch.load("step.pt2.init.pt", weights_only=True)
    init = [t.clone() for t in leaves]
    with torch.inference_mode():
        y_t, *leaves = pkg(x_t, *leaves)               # x_t [batch_size, embed_dim]
        # episode over in rows `done` [B] bool: those rows restart from the initial state
        leaves = [torch.where(done.view(-1, *[1] * (t.dim() - 1)), i, t) for t, i in zip(leaves, init)]

The value checks of eager mode (a full-attention step past ``max_len``) are not in the package:
keep the number of steps per stream below ``max_len``, or use a sliding window.

**The forward with a dynamic length**: ``forward_program(model, T, dynamic_len=True)`` keeps the
sequence length symbolic, for every registered model and backbone: one program runs any ``T`` in
``2..65536`` (``T = 1`` is the step: :func:`step_program`). Under export the chunked PyTorch forms
pad to whole chunks and run their chunk loops as one ``scan`` node (``ops/_time.py``); eager and
compiled runs keep their own loops.

**ONNX**: ``torch.onnx.export(step_program(model), f=path, dynamo=True)``, the same flat inputs and
outputs; ``torch.onnx.export(forward_program(model, T), f=path, dynamo=True)`` for the forward (a
fixed ``T``: ONNX has no form of the ``scan`` node of a dynamic-length program).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from hybridssm.state import ModelState, register_state_types

__all__ = ["export_step", "step_program", "forward_program", "init_leaves_path", "MIN_LEN", "MAX_LEN"]

# The range of T in a dynamic-length forward program (T = 1 is the step's, which branches apart).
MIN_LEN, MAX_LEN = 2, 65536


class _FlatStep(nn.Module):
    """``(x_t, *leaves) -> (y_t, *new_leaves)``: the functional step on a flattened state."""

    def __init__(self, model: nn.Module, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x_t: Tensor, *leaves: Tensor) -> tuple[Tensor, ...]:
        state = pytree.tree_unflatten(list(leaves), self.spec)
        y, new = self.model.step(x_t, state)
        return (y, *pytree.tree_flatten(new)[0])


class _Sequence(nn.Module):
    """``x [B, T, E] -> [B, T, hidden]``: the forward returning every timestep."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, return_sequence=True)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _example(model: nn.Module, *shape: int) -> Tensor:
    p = model.final_norm.weight
    return torch.randn(*shape, model.config.embed_dim, device=p.device, dtype=model._compute_dtype())


def step_program(model: nn.Module, *, batch_size: int = 1, max_len: int | None = None) -> ExportedProgram:
    """``torch.export`` of the functional step on a flat state, ``(x_t, *leaves) -> (y_t,
    *new_leaves)``, at a fixed ``batch_size`` and full-attention capacity ``max_len`` (default
    4096); ``leaves`` = ``tree_flatten(model.init_state(batch_size, max_len=max_len))[0]``.
    The model is put in ``eval()`` mode (dropout off)."""
    _check_positive("batch_size", batch_size)
    model.eval()
    state = model.init_state(batch_size, max_len=max_len)
    register_state_types(state)
    leaves, spec = pytree.tree_flatten(state)
    with torch.no_grad():
        return torch.export.export(_FlatStep(model, spec), (_example(model, batch_size), *leaves))


def init_leaves_path(path: str | os.PathLike) -> Path:
    """Where :func:`export_step` writes the initial state's leaves for the package at ``path``."""
    return Path(f"{os.fspath(path)}.init.pt")


def export_step(model: nn.Module, path: str | os.PathLike, *, batch_size: int = 1,
                max_len: int | None = None, inductor_configs: dict | None = None) -> Path:
    """Write an AOTInductor package of the functional step to ``path`` (a ``.pt2`` file) and the
    leaves of ``init_state(batch_size)`` to ``<path>.init.pt``; returns ``path``.

    Load it with ``torch._inductor.aoti_load_package(path)`` (no hybridssm needed) and call it as
    ``pkg(x_t, *leaves) -> (y_t, *new_leaves)``, ``x_t [batch_size, embed_dim]``, ``leaves`` in
    ``torch.utils._pytree.tree_flatten(state)`` order (see the module docstring for a loader).
    Compiling takes a while (C++: about a minute for a small model on one core);
    ``inductor_configs`` passes options to ``torch._inductor.aoti_compile_and_package`` (for a
    faster build of the same values, as the tests do: ``{"aot_inductor.debug_compile": True}``, no C++
    optimisation; ``"cpp.simdlen": 1``, scalar kernels; ``"aot_inductor.precompile_headers": False``)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"path must name a .pt2 file (an AOTInductor package), got {str(path)!r}")
    program = step_program(model, batch_size=batch_size, max_len=max_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs=dict(inductor_configs or {})
        )
    init: ModelState = model.init_state(batch_size, max_len=max_len)
    torch.save([t.detach().clone() for t in pytree.tree_leaves(init)], init_leaves_path(path))
    return path


def forward_program(model: nn.Module, seq_len: int, *, batch_size: int = 1,
                    dynamic_len: bool = False) -> ExportedProgram:
    """``torch.export`` of ``x [batch_size, T, embed_dim] -> model(x, return_sequence=True)``,
    traced at ``T = seq_len``, in ``eval()`` mode.

    ``dynamic_len=True`` keeps ``T`` symbolic: the program then takes any ``T`` in
    ``MIN_LEN..MAX_LEN`` (2..65536; ``T = 1`` is a step, which :func:`step_program` exports). Every
    registered model and hybrid backbone supports it: under export the chunked PyTorch forms run
    their chunk loops as one ``scan`` node. A model whose own code fixes ``T`` while tracing (a
    custom mixer with a Python loop over time, say) raises a ``ValueError`` naming the model; the
    recipe there is a fixed ``T`` (the default), or a fixed chunk streamed through the exported
    step."""
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    model.eval()
    x = _example(model, batch_size, seq_len)
    shapes = ({1: Dim("seq_len", min=MIN_LEN, max=MAX_LEN)},) if dynamic_len else None
    try:
        with torch.no_grad():
            return torch.export.export(_Sequence(model), (x,), dynamic_shapes=shapes)
    except torch._dynamo.exc.UserError as exc:
        if not dynamic_len:
            raise
        raise ValueError(
            f"forward_program(dynamic_len=True): {model.model_name!r} fixes the sequence length while "
            "tracing (some layer loops over the sequence in Python); use dynamic_len=False "
            f"(one T per program) or stream through step_program. torch said: {str(exc).splitlines()[0]}"
        ) from exc
