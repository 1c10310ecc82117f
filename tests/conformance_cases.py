"""The model cases the conformance suite runs over: every registered model (and, for ``hybrid``,
every registered backbone), each at its defaults and at one tiny fixed config (DESIGN §4)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

import custom_backbone  # noqa: F401  (registers the README's "ema" backbone: held to the rules too)
import hybridssm as hs
from hybridssm.backbones import get_backbone, list_backbones

# Options of the tiny fixed config, applied where a model has the option. W = 4, chunk = 8.
TINY = dict(
    embed_dim=5,
    hidden_size=16,
    num_layers=2,
    state_size=4,
    expand_factor=2,
    conv_size=3,
    num_heads=2,
    head_dim=8,
    ssm_head_dim=8,
    window_size=4,
    chunk_size=8,
    scan_chunk_size=8,
    attention_every=2,
    num_meta_tokens=2,
    dropout=0.0,
)
W, CHUNK, CONV = TINY["window_size"], TINY["chunk_size"], TINY["conv_size"]
# The boundary lengths of DESIGN §4.
LENGTHS = sorted({1, 2, CONV - 1, CONV, W, W + 1, CHUNK + 1, 2 * CHUNK + 3})
DEFAULT_EMBED = 20  # != hidden_size, so the input projection is exercised

# Extra tiny variants per model: options that switch code paths (sliding windows, global layers).
# The options users of transformers / mamba_ssm expect, at non-default values, a few per case.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "hybrid": [
        dict(use_sliding_window=False),
        dict(num_kv_heads=1, positional="rope", rope_theta=500.0, ffn_activation="swiglu",
             ffn_multiplier=2, attention_offset=0, norm="rmsnorm", norm_eps=1e-5,
             residual_in_fp32=True),
        # Jamba's layers (from_transformers): an FFN after every layer, no biases, inner norms
        dict(backbone_ffn=True, attention_bias=False, ffn_bias=False, ffn_hidden_size=24,
             backbone_options=(("inner_norms", True),)),
    ],
    "hymba": [
        dict(global_layers=(0,), dt_rank=2, dt_init="constant", conv_bias=False, dt_min=0.01,
             dt_max=0.05, residual_in_fp32=True),
        dict(meta_tokens="kv", proj_bias=True),
    ],
    "transformer": [
        dict(use_sliding_window=True),
        dict(num_kv_heads=1, positional="seed_sinusoidal", norm="rmsnorm", residual_in_fp32=True),
    ],
    "ss_transformer": [
        dict(ssm="mamba2", dt_min=0.01, dt_max=0.05, dt_init_floor=0.005, conv_bias=False,
             residual_in_fp32=True, num_groups=2, A_init_range=(2.0, 4.0), dt_limit=(0.001, 0.2),
             D_has_hdim=True, norm_before_gate=True, proj_bias=True),
    ],
    "mamba": [
        dict(norm="rmsnorm", norm_eps=1e-5, dt_rank=3, dt_init="constant", conv_bias=False,
             proj_bias=True, residual_in_fp32=False),
    ],
    "mamba2": [
        dict(norm="rmsnorm", D_has_hdim=True, norm_before_gate=True, dt_limit=(0.001, 0.2),
             A_init_range=(2.0, 4.0), conv_bias=False, proj_bias=True, residual_in_fp32=False),
    ],
}


@dataclass(frozen=True)
class Case:
    name: str
    opts: tuple = field(default=())  # sorted (key, value) pairs
    tiny: bool = True
    variant: bool = field(default=False, compare=False)  # from VARIANTS (non-default options)

    @property
    def id(self) -> str:
        extra = ",".join(
            f"{k}={v}" if k != "backbone_options" else ",".join(f"{a}={b}" for a, b in v)
            for k, v in self.opts
            if k not in TINY
        )
        return f"{self.name}[{'tiny' if self.tiny else 'default'}{',' + extra if extra else ''}]"

    def options(self) -> dict[str, Any]:
        opts = dict(self.opts)
        if "backbone_options" in opts:  # kept as pairs so that cases stay hashable
            opts["backbone_options"] = dict(opts["backbone_options"])
        return opts

    def build(self, **override: Any) -> torch.nn.Module:
        torch.manual_seed(1234)
        model = hs.build(self.name, **{**self.options(), **override})
        # Some layers start with zero output projections (RWKV, as its reference): perturb every
        # weight a little so that no path is trivially zero and every rule tests something.
        g = torch.Generator().manual_seed(4321)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
        return model


def fit_options(name: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The options of ``opts`` that model ``name`` takes: its own, less those of the SSM path it
    does not run (``ss_transformer`` refuses Mamba-2's sizes with ``ssm="mamba"``)."""
    cls = hs.get_config_class(name)
    fitted = {k: v for k, v in opts.items() if k in set(cls.option_names())}
    paths = getattr(cls, "path_options", {})
    ssm = fitted.get("ssm", getattr(cls, "ssm", None))
    other = {k for path, options in paths.items() if path != ssm for k in options}
    return {k: v for k, v in fitted.items() if k not in other}


def _freeze(opts: dict[str, Any]) -> tuple:
    return tuple(sorted(opts.items()))


def all_cases(include_default: bool = True) -> list[Case]:
    cases = []
    for name in hs.list_models():
        extras: list[dict[str, Any]] = [{}]
        if name == "hybrid":
            extras = [dict(backbone=b) for b in list_backbones()]
        for extra in extras:
            tiny_extra = dict(extra)
            if "backbone" in extra and "scan_chunk_size" in get_backbone(extra["backbone"]).options:
                # the backbone's own chunk, small enough that the boundary lengths cross chunks
                tiny_extra["backbone_options"] = (("scan_chunk_size", CHUNK),)
            cases.append(Case(name, _freeze(fit_options(name, {**TINY, **tiny_extra})), tiny=True))
            if include_default:
                cases.append(Case(name, _freeze({"embed_dim": DEFAULT_EMBED, **extra}), tiny=False))
        for variant in VARIANTS.get(name, []):
            opts = fit_options(name, {**TINY, **variant})
            if set(variant) <= set(opts):
                cases.append(Case(name, _freeze(opts), tiny=True, variant=True))
    return cases


def tiny_cases() -> list[Case]:
    return [c for c in all_cases() if c.tiny]


def every_state_kind_case() -> Case:
    """The tiny case that holds every kind of streaming state, for the tests too slow to run on
    every model by default: Hymba with ``global_layers=(0,)`` (layer 0 attends to the whole stream,
    layer 1 within a window, each beside a Mamba mixer, after meta tokens)."""
    return next(c for c in tiny_cases() if c.name == "hymba" and c.options().get("global_layers") == (0,))


@functools.cache
def cached_model(case: Case) -> torch.nn.Module:
    """One eval-mode model per case, shared by the read-only tests."""
    return case.build().eval()
