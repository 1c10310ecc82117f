"""The model a task trains: input (token embedding, or float frames as they are) -> backbone (whole
sequence) -> linear head; saved whole by :meth:`TaskModel.save_pretrained`, loaded by ``hs.load``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["TaskModel"]


class TaskModel(nn.Module):
    """``inputs -> outputs [B, T, num_outputs]``.

    ``inputs`` are token ids ``[B, T]`` (through an embedding of width ``embed_dim``) when
    ``vocab_size`` is given, else float frames ``[B, T, embed_dim]`` fed to the backbone as they
    are (its own input projection maps them to ``hidden_size``). The backbone is any registered
    model run with ``return_sequence=True``; the head reads every position (the loss picks the
    scored ones: class logits, or regression values).

    ``save_pretrained(path)`` writes the whole model (embedding, backbone, head) with its config;
    ``hs.load(path)`` returns it (in eval mode), and ``hs.load(path).backbone`` is the trained
    backbone, which has its own ``save_pretrained``.
    """

    def __init__(self, backbone: nn.Module, vocab_size: int | None, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.vocab_size, self.num_outputs = vocab_size, num_outputs
        self.embedding = nn.Embedding(vocab_size, backbone.config.embed_dim) if vocab_size else None
        self.head = nn.Linear(backbone.output_size, num_outputs)

    def forward(self, inputs: Tensor) -> Tensor:
        # [B, T] ids -> [B, T, E]; under autocast the backbone casts its projections
        h = self.embedding(inputs) if self.embedding is not None else inputs
        return self.head(self.backbone(h, return_sequence=True))  # [B, T, num_outputs]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The backbone's groups (no decay on marked SSM parameters, norms, biases), plus the
        embedding and head weights with decay and the head bias without."""
        groups = self.backbone.param_groups(weight_decay)
        own = [self.embedding.weight] if self.embedding is not None else []
        groups[0]["params"] = [*groups[0]["params"], *own, self.head.weight]
        groups[1]["params"] = [*groups[1]["params"], self.head.bias]
        return groups

    # -- save / load --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` (the backbone's config plus ``task_model``: ``vocab_size``,
        ``num_outputs``) and ``model.safetensors`` (every weight) into the directory ``path``."""
        from hybridssm import io

        spec = {"vocab_size": self.vocab_size, "num_outputs": self.num_outputs}
        return io.save_pretrained(self, path, backbone=self.backbone, extra={"task_model": spec})

    @classmethod
    def around(cls, backbone: nn.Module, spec: Any) -> TaskModel:
        """The task model described by a saved ``task_model`` entry, around ``backbone``."""
        vocab, outputs = cls.check_spec(spec)
        return cls(backbone, vocab, outputs)

    @staticmethod
    def check_spec(spec: Any) -> tuple[int | None, int]:
        """``(vocab_size, num_outputs)`` of a saved ``task_model`` entry; ``ValueError`` otherwise."""
        if not isinstance(spec, dict) or set(spec) != {"vocab_size", "num_outputs"}:
            raise ValueError(f"'task_model' must hold vocab_size and num_outputs, got {spec!r}")
        vocab, outputs = spec["vocab_size"], spec["num_outputs"]
        for name, v, low in (("vocab_size", vocab, 1), ("num_outputs", outputs, 1)):
            if not (v is None and name == "vocab_size") and not (
                    isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise ValueError(f"'task_model' {name} must be an integer >= {low}, got {v!r}")
        return vocab, outputs
