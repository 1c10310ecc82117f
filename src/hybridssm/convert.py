"""Pretrained weights from ``transformers``: ``hs.from_transformers(model_or_directory)``.

Converts the *backbone* of ``MambaModel`` / ``MambaForCausalLM`` and ``Mamba2Model`` /
``Mamba2ForCausalLM`` into the matching ``hybridssm`` model: RMSNorm blocks and final norm with
the source's epsilon, no input projection (``embed_dim == hidden_size``), the source's Mamba
options (``dt_rank``, ``conv_bias``, ``proj_bias``, Mamba-2's ``num_groups`` = ``n_groups``,
``ssm_head_dim`` = ``head_dim``, ``dt_limit`` = ``time_step_limit``, ...) and its weights, in
fp32. Then ``model(inputs_embeds, return_sequence=True)`` equals the source's
``last_hidden_state`` and the model streams with ``step``, runs the fused CPU kernels and saves
with ``save_pretrained``. The token embedding and LM head stay in the source model (a converted
model maps embeddings to hidden states), so tied embeddings need nothing here.

What has no equivalent raises a ``ValueError`` naming it: another ``hidden_act`` than SiLU, a
Mamba-2 whose ``num_heads * head_dim`` is not ``expand * hidden_size``, and every other
architecture (``JambaModel``: its MoE layers and inner dt/B/C norms are not mapped yet).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridssm.registry import build

__all__ = ["from_transformers", "SUPPORTED"]

SUPPORTED = ("mamba", "mamba2")


def _load(source: Any) -> nn.Module:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"from_transformers: {str(path)!r} is not a directory saved with save_pretrained "
                "(no config.json)"
            )
        from transformers import AutoModel

        return AutoModel.from_pretrained(path)
    if not isinstance(source, nn.Module) or not hasattr(source, "config"):
        raise TypeError(
            "from_transformers takes a transformers model or a directory saved with "
            f"save_pretrained, got {type(source).__name__}"
        )
    return source


def _backbone(model: nn.Module) -> nn.Module:
    """``MambaForCausalLM.backbone`` (or the base model itself)."""
    return getattr(model, "backbone", model)


def _check_act(cfg: Any) -> None:
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"from_transformers: hidden_act={act!r} has no equivalent (hybridssm's Mamba uses 'silu')"
        )


def _mamba(cfg: Any, src: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    _check_act(cfg)
    d = cfg.hidden_size
    rank = cfg.time_step_rank
    opts = dict(
        embed_dim=d, hidden_size=d, num_layers=cfg.num_hidden_layers, state_size=cfg.state_size,
        expand_factor=cfg.expand, conv_size=cfg.conv_kernel,
        dt_rank=math.ceil(d / 16) if rank == "auto" else int(rank),
        conv_bias=cfg.use_conv_bias, proj_bias=cfg.use_bias, norm="rmsnorm",
        norm_eps=cfg.layer_norm_epsilon, dropout=0.0,
    )
    sd: dict[str, torch.Tensor] = {"final_norm.weight": src.norm_f.weight}
    for i, layer in enumerate(src.layers):
        m, p = layer.mixer, f"blocks.{i}."
        sd.update({
            p + "norm.weight": layer.norm.weight,
            p + "mixer.in_proj.weight": m.in_proj.weight,
            p + "mixer.conv.weight": m.conv1d.weight[:, 0, :],  # [E, 1, K] -> [E, K]
            p + "mixer.ssm.x_proj.weight": m.x_proj.weight,
            p + "mixer.ssm.dt_proj.weight": m.dt_proj.weight,
            p + "mixer.ssm.dt_bias": m.dt_proj.bias,
            p + "mixer.ssm.A_log": m.A_log,
            p + "mixer.ssm.D": m.D,
            p + "mixer.out_proj.weight": m.out_proj.weight,
        })
        for ours, theirs in (("conv.bias", m.conv1d.bias), ("in_proj.bias", m.in_proj.bias),
                             ("out_proj.bias", m.out_proj.bias)):
            if theirs is not None:
                sd[p + "mixer." + ours] = theirs
    return opts, sd


def _mamba2(cfg: Any, src: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    _check_act(cfg)
    d = cfg.hidden_size
    E = int(cfg.expand * d)
    if cfg.num_heads * cfg.head_dim != E:
        raise ValueError(
            f"from_transformers: num_heads * head_dim = {cfg.num_heads} * {cfg.head_dim} must equal "
            f"expand * hidden_size = {E} (hybridssm's Mamba-2 has no extra MLP channels)"
        )
    opts = dict(
        embed_dim=d, hidden_size=d, num_layers=cfg.num_hidden_layers, state_size=cfg.state_size,
        expand_factor=cfg.expand, conv_size=cfg.conv_kernel, ssm_head_dim=cfg.head_dim,
        num_groups=cfg.n_groups, conv_bias=cfg.use_conv_bias, proj_bias=cfg.use_bias,
        dt_limit=tuple(float(v) for v in cfg.time_step_limit), norm="rmsnorm",
        norm_eps=cfg.layer_norm_epsilon, dropout=0.0,
    )
    sd: dict[str, torch.Tensor] = {"final_norm.weight": src.norm_f.weight}
    for i, layer in enumerate(src.layers):
        m, p = layer.mixer, f"blocks.{i}."
        sd[p + "norm.weight"] = layer.norm.weight
        for name in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D",
                     "dt_bias", "norm.weight", "out_proj.weight", "out_proj.bias"):
            value = m.get_parameter(name) if _has(m, name) else None
            if value is not None:
                sd[p + "mixer." + name] = value
    return opts, sd


def _has(module: nn.Module, name: str) -> bool:
    try:
        return module.get_parameter(name) is not None
    except AttributeError:
        return False


_CONVERTERS = {"mamba": _mamba, "mamba2": _mamba2}


def from_transformers(source: Any) -> nn.Module:
    """A ``hybridssm`` model with the weights of a ``transformers`` Mamba / Mamba-2 backbone.

    Args:
        source: ``MambaModel``, ``MambaForCausalLM``, ``Mamba2Model``, ``Mamba2ForCausalLM``, or
            a local directory saved with their ``save_pretrained`` (no download).

    Returns the converted model (fp32, eval mode): ``model(inputs_embeds, return_sequence=True)``
    is the source's ``last_hidden_state``, where ``inputs_embeds`` come from the source's
    embedding (``source.get_input_embeddings()``).
    """
    hf = _load(source)
    cfg = hf.config
    kind = getattr(cfg, "model_type", type(hf).__name__)
    if kind not in _CONVERTERS:
        extra = (" (Jamba's MoE layers and inner dt/B/C norms have no equivalent yet)"
                 if kind == "jamba" else "")
        raise ValueError(
            f"from_transformers: model_type {kind!r} ({type(hf).__name__}) is not supported{extra}; "
            f"supported: {', '.join(map(repr, SUPPORTED))}"
        )
    opts, sd = _CONVERTERS[kind](cfg, _backbone(hf))
    model = build(kind, **opts)
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.eval()
