"""The model registry: name -> (Config, Model), and the functions of the seeds' API."""

from __future__ import annotations

from typing import Any

import torch

from hybridssm.checks import suggest
from hybridssm.config import ModelConfig

__all__ = [
    "register_model",
    "build",
    "list_models",
    "get_config_class",
    "get_model_class",
    "output_size",
    "param_count",
    "recommended_defaults",
]

_MODELS: dict[str, tuple[type[ModelConfig], type]] = {}


def register_model(name: str, config_class: type[ModelConfig]):
    """Class decorator: register a :class:`~hybridssm.models.base.SequenceModel` under ``name``."""

    def deco(model_class: type) -> type:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        config_class.model_name = name
        model_class.config_class = config_class
        model_class.model_name = name
        _MODELS[name] = (config_class, model_class)
        return model_class

    return deco


def _entry(name: str) -> tuple[type[ModelConfig], type]:
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}{suggest(str(name), _MODELS)}; "
            f"available: {', '.join(list_models())}"
        )
    return _MODELS[name]


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def get_config_class(name: str) -> type[ModelConfig]:
    return _entry(name)[0]


def get_model_class(name: str) -> type:
    return _entry(name)[1]


def build(name: str, **opts: Any) -> torch.nn.Module:
    """Build a registered model: ``build(name, **opts) == Model(Config(**opts))``.

    Unknown options raise ``TypeError`` with a close-match suggestion; bad values raise
    ``ValueError`` naming the option, before any weight is allocated.
    """
    config_class, model_class = _entry(name)
    return model_class(config_class.from_options(**opts))


def output_size(name: str, **opts: Any) -> int:
    """Width of the model's output features (``hidden_size``); ``embed_dim`` is not needed."""
    config_class, _ = _entry(name)
    opts.setdefault("embed_dim", 1)
    return config_class.from_options(**opts).hidden_size


def param_count(name: str, **opts: Any) -> int:
    """Exact number of parameters, computed on the meta device (no weight is allocated)."""
    config_class, model_class = _entry(name)
    config = config_class.from_options(**opts)
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def recommended_defaults(name: str) -> dict[str, Any]:
    """The seed library's recommended options for ``name`` (a fresh dict)."""
    config_class, _ = _entry(name)
    return dict(config_class.recommended)


def load(path: str, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model written by ``save_pretrained(path)``; bitwise the same outputs.

    Raises ``FileNotFoundError`` for a missing directory or file, ``ValueError`` for a corrupted
    file or a config/weights mismatch (naming the keys or shapes that differ).
    """
    import json
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from hybridssm.models.base import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE

    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected a directory written by save_pretrained")
    try:
        meta = json.loads(cfg_path.read_text())
        name, options = meta["model"], meta["config"]
        version = meta.get("format_version", FORMAT_VERSION)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path} is corrupted or not a hybridssm config: {exc}") from exc
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path}: format_version {version} is newer than this hybridssm "
            f"({FORMAT_VERSION}); upgrade hybridssm"
        )
    config_class, model_class = _entry(name)
    model = model_class(config_class.from_dict(options))
    dtype = getattr(torch, meta.get("dtype", "float32"), None)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    try:
        tensors = load_file(str(w_path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{w_path} is corrupted or unreadable: {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: config wants {tuple(expected[k].shape)}, file has {tuple(tensors[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if expected[k].shape != tensors[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        parts += shapes[:5]
        raise ValueError(f"{w_path} does not match {cfg_path}: " + "; ".join(parts))
    model.load_state_dict(tensors)
    return model.to(map_location)
