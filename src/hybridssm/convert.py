"""Pretrained weights from ``transformers``: ``hs.from_transformers(model_or_directory)``.

Converts the *backbone* of ``MambaModel`` / ``MambaForCausalLM`` and ``Mamba2Model`` /
``Mamba2ForCausalLM`` into the matching ``hybridssm`` model: RMSNorm blocks and final norm with
the source's epsilon, no input projection (``embed_dim == hidden_size``), the source's Mamba
options (``dt_rank``, ``conv_bias``, ``proj_bias``, Mamba-2's ``num_groups`` = ``n_groups``,
``ssm_head_dim`` = ``head_dim``, ``dt_limit`` = ``time_step_limit``, ...) and its weights, in
fp32. ``JambaModel`` / ``JambaForCausalLM`` with dense FFNs become a ``hybrid``: Mamba layers
with the inner dt/B/C norms (``backbone_options`` ``inner_norms``), bias-free grouped-query
attention without positions every ``attn_layer_period`` layers from ``attn_layer_offset``
(``attention_every``, ``attention_offset``), and a bias-free SwiGLU FFN after every layer
(``backbone_ffn``, ``ffn_hidden_size`` = ``intermediate_size``). Then
``model(inputs_embeds, return_sequence=True)`` equals the source's ``last_hidden_state`` and the
model streams with ``step`` and saves with ``save_pretrained``. The token embedding and LM head
stay in the source model (a converted model maps embeddings to hidden states), so tied
embeddings need nothing here.

What has no equivalent raises a ``ValueError`` naming it: another ``hidden_act`` than SiLU, a
Mamba-2 whose ``num_heads * head_dim`` is not ``expand * hidden_size``, Jamba's mixture-of-experts
layers (``num_experts > 1``), and every other architecture.
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

SUPPORTED = ("mamba", "mamba2", "jamba")
Converted = tuple[str, dict[str, Any], dict[str, torch.Tensor]]  # (model name, options, state dict)


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
    """``MambaForCausalLM.backbone``, ``JambaForCausalLM.model`` (or the base model itself)."""
    return getattr(model, "base_model", model)


def _check_act(cfg: Any) -> None:
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"from_transformers: hidden_act={act!r} has no equivalent (hybridssm's Mamba uses 'silu')"
        )


def _dt_rank(rank: Any, d: int) -> int:
    return math.ceil(d / 16) if rank == "auto" else int(rank)


def _mamba_mixer(m: nn.Module, p: str) -> dict[str, torch.Tensor]:
    """The weights of a ``transformers`` Mamba mixer (``MambaMixer``, ``JambaMambaMixer``) under
    prefix ``p`` of our ``MambaMixer``."""
    sd = {
        p + "in_proj.weight": m.in_proj.weight,
        p + "conv.weight": m.conv1d.weight[:, 0, :],  # [E, 1, K] -> [E, K]
        p + "ssm.x_proj.weight": m.x_proj.weight,
        p + "ssm.dt_proj.weight": m.dt_proj.weight,
        p + "ssm.dt_bias": m.dt_proj.bias,
        p + "ssm.A_log": m.A_log,
        p + "ssm.D": m.D,
        p + "out_proj.weight": m.out_proj.weight,
    }
    for ours, theirs in (("conv.bias", m.conv1d.bias), ("in_proj.bias", m.in_proj.bias),
                         ("out_proj.bias", m.out_proj.bias)):
        if theirs is not None:
            sd[p + ours] = theirs
    return sd


def _mamba(cfg: Any, src: nn.Module) -> Converted:
    _check_act(cfg)
    d = cfg.hidden_size
    opts = dict(
        embed_dim=d, hidden_size=d, num_layers=cfg.num_hidden_layers, state_size=cfg.state_size,
        expand_factor=cfg.expand, conv_size=cfg.conv_kernel,
        dt_rank=_dt_rank(cfg.time_step_rank, d),
        conv_bias=cfg.use_conv_bias, proj_bias=cfg.use_bias, norm="rmsnorm",
        norm_eps=cfg.layer_norm_epsilon, residual_in_fp32=cfg.residual_in_fp32, dropout=0.0,
    )
    sd: dict[str, torch.Tensor] = {"final_norm.weight": src.norm_f.weight}
    for i, layer in enumerate(src.layers):
        sd[f"blocks.{i}.norm.weight"] = layer.norm.weight
        sd.update(_mamba_mixer(layer.mixer, f"blocks.{i}.mixer."))
    return "mamba", opts, sd


def _mamba2(cfg: Any, src: nn.Module) -> Converted:
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
        norm_eps=cfg.layer_norm_epsilon, residual_in_fp32=cfg.residual_in_fp32, dropout=0.0,
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
    return "mamba2", opts, sd


def _jamba(cfg: Any, src: nn.Module) -> Converted:
    _check_act(cfg)  # the Mamba conv's activation and the MLP's gate
    moe = [i for i, n in enumerate(cfg.layers_num_experts) if n > 1]
    if moe:
        raise ValueError(
            f"from_transformers: Jamba's mixture-of-experts layers (num_experts={cfg.num_experts} "
            f"on layers {moe}) have no equivalent (hybridssm's FFNs are dense); only configs with "
            "num_experts=1 convert"
        )
    d, eps = cfg.hidden_size, cfg.rms_norm_eps
    H = cfg.num_attention_heads
    opts = dict(
        embed_dim=d, hidden_size=d, num_layers=cfg.num_hidden_layers, backbone="mamba",
        attention_every=cfg.attn_layer_period, attention_offset=cfg.attn_layer_offset,
        state_size=cfg.mamba_d_state, expand_factor=cfg.mamba_expand, conv_size=cfg.mamba_d_conv,
        backbone_options=dict(
            dt_rank=_dt_rank(cfg.mamba_dt_rank, d), conv_bias=cfg.mamba_conv_bias,
            proj_bias=cfg.mamba_proj_bias, inner_norms=True, inner_norm_eps=eps,
        ),
        num_heads=H, num_kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or d // H,  # JambaAttention's rule
        use_sliding_window=False, qk_layernorm=False, positional="none", attention_bias=False,
        attention_dropout=cfg.attention_dropout, backbone_ffn=True, ffn_activation="swiglu",
        ffn_hidden_size=cfg.intermediate_size, ffn_bias=False, norm="rmsnorm", norm_eps=eps,
        dropout=0.0,
    )
    sd: dict[str, torch.Tensor] = {"final_norm.weight": src.final_layernorm.weight}
    for i, layer in enumerate(src.layers):
        p, f = f"blocks.{i}.", layer.feed_forward
        sd.update({
            p + "norm.weight": layer.input_layernorm.weight,
            p + "ffn.norm.weight": layer.pre_ff_layernorm.weight,
            p + "ffn.ffn.gate.weight": f.gate_proj.weight,
            p + "ffn.ffn.up.weight": f.up_proj.weight,
            p + "ffn.ffn.down.weight": f.down_proj.weight,
        })
        if hasattr(layer, "mamba"):
            m = layer.mamba
            sd.update(_mamba_mixer(m, p + "mixer."))
            sd.update({p + "mixer.ssm.dt_norm.weight": m.dt_layernorm.weight,
                       p + "mixer.ssm.b_norm.weight": m.b_layernorm.weight,
                       p + "mixer.ssm.c_norm.weight": m.c_layernorm.weight})
        else:
            a = layer.self_attn
            sd[p + "mixer.qkv_proj.weight"] = torch.cat(  # our fused [q; k; v] rows
                [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0)
            sd[p + "mixer.o_proj.weight"] = a.o_proj.weight
    return "hybrid", opts, sd


def _has(module: nn.Module, name: str) -> bool:
    try:
        return module.get_parameter(name) is not None
    except AttributeError:
        return False


_CONVERTERS = {"mamba": _mamba, "mamba2": _mamba2, "jamba": _jamba}


def from_transformers(source: Any) -> nn.Module:
    """A ``hybridssm`` model with the weights of a ``transformers`` Mamba / Mamba-2 / Jamba backbone.

    Args:
        source: ``MambaModel``, ``MambaForCausalLM``, ``Mamba2Model``, ``Mamba2ForCausalLM``,
            ``JambaModel``, ``JambaForCausalLM`` (dense FFNs: ``num_experts=1``), or a local
            directory saved with their ``save_pretrained`` (no download).

    Returns the converted model (fp32, eval mode): ``model(inputs_embeds, return_sequence=True)``
    is the source's ``last_hidden_state``, where ``inputs_embeds`` come from the source's
    embedding (``source.get_input_embeddings()``).
    """
    hf = _load(source)
    cfg = hf.config
    kind = getattr(cfg, "model_type", type(hf).__name__)
    if kind not in _CONVERTERS:
        raise ValueError(
            f"from_transformers: model_type {kind!r} ({type(hf).__name__}) is not supported; "
            f"supported: {', '.join(map(repr, SUPPORTED))}"
        )
    name, opts, sd = _CONVERTERS[kind](cfg, _backbone(hf))
    model = build(name, **opts)
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.eval()
