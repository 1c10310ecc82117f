"""Hybrid backbones: name -> mixer factory, with the options each one takes.

A backbone factory is called as ``factory(hidden_size, **options)`` and returns a mixer that follows
the contract of :mod:`hybridssm.mixers.base`. The seed's Mamba options (``state_size``,
``expand_factor``, ``conv_size``) go to every backbone whose factory takes them; every other option
comes from ``backbone_options`` and is validated against the factory's keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hybridssm.checks import suggest, unknown_option_error
from hybridssm.registry import Registry, same_definition

__all__ = [
    "Backbone",
    "SEED_OPTIONS",
    "MODEL_DEFAULTS",
    "backbone_kwargs",
    "register_backbone",
    "get_backbone",
    "list_backbones",
    "build_backbone_mixer",
]

SEED_OPTIONS = ("state_size", "expand_factor", "conv_size")
# Model options the seed's hybrid also hands to a backbone that takes them (rwkv, delta_net,
# gated_delta_net get the model's ``num_heads``); unlike SEED_OPTIONS, an explicit
# ``backbone_options`` value wins (and a ``head_dim`` there keeps the backbone's own head count).
MODEL_DEFAULTS = ("num_heads",)
# The position-wise MLP a backbone's seed layer includes after its mixer: (activation, multiplier).
# Griffin's residual block is the RG-LRU temporal block followed by its gated MLP (x3, GeGLU).
BACKBONE_MLP: dict[str, tuple[str, int]] = {"griffin_lru": ("geglu", 3)}


@dataclass(frozen=True)
class Backbone:
    name: str
    factory: Callable[..., nn.Module]
    options: Mapping[str, Any] = field(default_factory=dict)  # backbone_options and defaults
    seed_options: tuple[str, ...] = ()  # which of SEED_OPTIONS the factory takes
    builtin: bool = False

    @property
    def model_options(self) -> tuple[str, ...]:
        """Which of MODEL_DEFAULTS the factory takes (the model's value unless overridden)."""
        return tuple(k for k in MODEL_DEFAULTS if k in self.options)

    @property
    def mlp(self) -> tuple[str, int] | None:
        """``(activation, multiplier)`` of the MLP the backbone's layer includes, or None."""
        return BACKBONE_MLP.get(self.name) if self.builtin else None


_BACKBONES: Registry[Backbone] = Registry(
    "backbone", hint="register your own with hybridssm.register_backbone"
)


def _describe(factory: Callable[..., nn.Module]) -> tuple[dict[str, Any], tuple[str, ...]]:
    params = list(inspect.signature(factory).parameters.values())
    if not params:
        raise TypeError("a backbone factory must take hidden_size as its first argument")
    options, seed = {}, []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in SEED_OPTIONS:
            seed.append(p.name)
        else:
            options[p.name] = None if p.default is p.empty else p.default
    return options, tuple(seed)


def register_backbone(
    name: str, factory: Callable[..., nn.Module], *, replace: bool = False, builtin: bool = False
) -> Backbone:
    """Make ``hybrid(backbone=name)`` buildable, savable and loadable by name.

    ``factory(hidden_size, **options)`` returns a mixer (``forward(x, state=None, *, lengths=None)
    -> (y, state)`` and ``init_state(batch_size, *, device, dtype, max_len)``). Its keyword
    arguments are the options ``backbone_options`` may set. A name already registered to another
    factory raises ``ValueError`` unless ``replace=True`` (a new definition of the same factory, from
    code run again, replaces it); built-in backbones are never replaced.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"backbone name must be an identifier string, got {name!r}")
    if name == "attention":
        raise ValueError("backbone name 'attention' is reserved for the attention layers")
    if not callable(factory):
        raise TypeError(f"backbone factory must be callable, got {type(factory).__name__}")
    existing = _BACKBONES[name] if name in _BACKBONES else None
    if existing is not None and existing.builtin:
        raise ValueError(f"backbone {name!r} is built in and cannot be replaced")
    if existing is not None and existing.factory is factory:
        return existing  # the same factory again (a plugin module imported twice)
    # a new definition of the same factory (code run again) replaces it; another one needs replace=
    replace = replace or (existing is not None and same_definition(existing.factory, factory))
    options, seed = _describe(factory)
    return _BACKBONES.register(name, Backbone(name, factory, options, seed, builtin), replace=replace)


def list_backbones() -> list[str]:
    """Names of the registered backbones (built in and custom), sorted."""
    return _BACKBONES.names()


def get_backbone(backbone: str | Callable[..., nn.Module]) -> Backbone:
    """The spec of a registered backbone, or an unregistered spec for a factory passed directly."""
    if callable(backbone) and not isinstance(backbone, str):
        for spec in _BACKBONES.values():
            if spec.factory is backbone:
                return spec
        options, seed = _describe(backbone)
        return Backbone("custom", backbone, options, seed)  # the seed's name for a custom backbone
    if backbone not in _BACKBONES:
        raise ValueError(
            f"option 'backbone' must be one of {', '.join(map(repr, list_backbones()))} or a "
            f"factory; got {backbone!r}{suggest(str(backbone), _BACKBONES)} "
            "(register your own with hybridssm.register_backbone)"
        )
    return _BACKBONES[backbone]


def validate_backbone_options(spec: Backbone, options: Mapping[str, Any]) -> None:
    if not isinstance(options, Mapping):
        raise ValueError(f"option 'backbone_options' must be a mapping, got {type(options).__name__}")
    for key in options:
        if key in SEED_OPTIONS:
            raise ValueError(
                f"backbone_options: {key!r} is a model option (set {key}= on the model itself)"
            )
        if key not in spec.options:
            raise unknown_option_error(f"backbone {spec.name!r}", key, spec.options)
    check = _OPTION_CHECKS.get(spec.name) if spec.builtin else None
    if check is not None:
        check(**{**spec.options, **options})


def backbone_kwargs(
    spec: Backbone, model_values: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The keyword arguments the factory gets: the seed options it takes, the model's values of
    MODEL_DEFAULTS it takes (unless ``backbone_options`` sets them or a ``head_dim``), and the
    validated ``backbone_options``."""
    validate_backbone_options(spec, options)
    kwargs = {k: model_values[k] for k in spec.seed_options}
    if "head_dim" not in options:
        kwargs.update({k: model_values[k] for k in spec.model_options if k in model_values})
    kwargs.update(options)
    return kwargs


def build_backbone_mixer(
    spec: Backbone, hidden_size: int, model_values: Mapping[str, Any], options: Mapping[str, Any]
) -> nn.Module:
    """Call the factory with :func:`backbone_kwargs`."""
    return spec.factory(hidden_size, **backbone_kwargs(spec, model_values, options))


# Built-in backbones: name -> "module:factory" (imported here, once).
_BUILTINS = {
    "delta_net": "hybridssm.mixers.delta_net:DeltaNetMixer",
    "gated_delta_net": "hybridssm.mixers.gated_delta_net:GatedDeltaNetMixer",
    "gated_ssm": "hybridssm.mixers.gated_ssm:GatedSSMMixer",
    "griffin_lru": "hybridssm.mixers.rglru:RGLRUMixer",
    "gru": "hybridssm.mixers.gru:GRUMixer",
    "mamba": "hybridssm.mixers.mamba:MambaMixer",
    "mamba2": "hybridssm.mixers.mamba2:Mamba2Mixer",
    "rwkv": "hybridssm.mixers.rwkv:RWKVMixer",
}

# Built-in backbones whose option values are checked with the model's config, before any weight
# (as ``mamba2``'s own options are): the factory's checks that need no width, called with every
# option (``backbone_options`` over the factory's defaults). The factory checks the rest on build.
_OPTION_CHECK_TARGETS = {"mamba2": "hybridssm.mixers.mamba2:check_mamba2_options"}
_OPTION_CHECKS: dict[str, Callable[..., None]] = {}


def _resolve(target: str) -> Any:
    import importlib

    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def _register_builtins() -> None:
    for name, target in _BUILTINS.items():
        register_backbone(name, _resolve(target), builtin=True)
    _OPTION_CHECKS.update({name: _resolve(t) for name, t in _OPTION_CHECK_TARGETS.items()})


_register_builtins()
