"""Registries (one small type for models, backbones and tasks) and the model registry: name ->
model class (its config class is ``model_class.config_class``), with the functions of the seeds' API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch

from hybridssm.checks import suggest
from hybridssm.config import ModelConfig

__all__ = [
    "Registry",
    "same_definition",
    "register_model",
    "build",
    "list_models",
    "get_config_class",
    "get_model_class",
    "output_size",
    "param_count",
    "recommended_defaults",
    "load",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind (``kind``: "model", "backbone", "task").

    ``register(name, obj)`` or ``@register(name)``; an existing name raises ``ValueError`` unless
    the object is the same definition again (:func:`same_definition`: a module imported twice, a
    notebook cell run again, which replaces it) or ``replace=True``. ``get``
    of an unknown name raises ``ValueError`` with a "did you mean" and the available names (and
    ``hint``, e.g. how to register one). It reads like a mapping: ``name in r``, ``r[name]``,
    ``iter(r)`` (sorted names), ``r.items()``.
    """

    def __init__(self, kind: str, *, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> Any:
        """Register ``obj`` under ``name`` and return it; without ``obj``, a decorator."""
        if obj is None:
            return lambda o: self.register(name, o, replace=replace)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        old = self._items.get(name)
        if old is not None and not same_definition(old, obj) and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pick another name, or pass "
                "replace=True to replace it"
            )
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``ValueError`` with suggestions otherwise."""
        if not isinstance(name, str) or name not in self._items:
            hint = f" ({self.hint})" if self.hint else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{suggest(str(name), self._items)}; "
                f"available: {', '.join(self.names())}{hint}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Remove ``name`` (a plugin unloaded, a test cleaning up); ``default`` if absent."""
        return self._items.pop(name, default)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def values(self) -> list[T]:
        return [v for _, v in self.items()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def same_definition(a: Any, b: Any) -> bool:
    """Whether ``b`` is ``a`` or a new definition of it: a class or function of the same qualified
    name (re-running the code that defines and registers it makes a new object). Lambdas, which all
    share one name, count only when identical."""
    if a is b:
        return True
    qa, qb = getattr(a, "__qualname__", None), getattr(b, "__qualname__", None)
    return isinstance(qa, str) and qa == qb and "<lambda>" not in qa


MODELS: Registry[type] = Registry("model", hint="register your own with hybridssm.register_model")


def register_model(name: str, config_class: type[ModelConfig]) -> Callable[[type], type]:
    """Class decorator: register a :class:`~hybridssm.models.base.SequenceModel` under ``name``
    with its config class (``build(name, **opts) == Model(Config(**opts))``)."""

    def deco(model_class: type) -> type:
        MODELS.register(name, model_class)
        config_class.model_name = name
        model_class.config_class = config_class
        model_class.model_name = name
        return model_class

    return deco


def _entry(name: str) -> tuple[type[ModelConfig], type]:
    model_class = MODELS.get(name)
    return model_class.config_class, model_class


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return MODELS.names()


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
    """Load a model written by ``save_pretrained(path)``: bitwise the same outputs, returned in
    eval mode (as ``from_pretrained`` does; call ``.train()`` to fine-tune).

    Raises ``FileNotFoundError`` for a missing directory or file, ``ValueError`` naming the file for
    a corrupt or foreign one or a config/weights mismatch (the tensors, expected and found shapes or
    dtypes), checked from the config and the safetensors header before any weight is allocated.
    See :mod:`hybridssm.io`.
    """
    from hybridssm import io

    return io.load(path, map_location=map_location)
