"""The model a task trains: token embedding -> backbone (whole sequence) -> linear head."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["TaskModel"]


class TaskModel(nn.Module):
    """``tokens [B, T] -> logits [B, T, num_classes]``.

    The backbone is any registered model, built with ``embed_dim`` = the embedding width and run
    with ``return_sequence=True``; the head reads every position (the loss picks the scored ones).
    """

    def __init__(self, backbone: nn.Module, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = nn.Embedding(vocab_size, backbone.config.embed_dim)
        self.head = nn.Linear(backbone.output_size, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embedding(tokens)  # [B, T, E]; under autocast the backbone casts its projections
        return self.head(self.backbone(h, return_sequence=True))  # [B, T, C]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The backbone's groups (no decay on marked SSM parameters, norms, biases), plus the
        embedding and head weights with decay and the head bias without."""
        groups = self.backbone.param_groups(weight_decay)
        groups[0]["params"] = [*groups[0]["params"], self.embedding.weight, self.head.weight]
        groups[1]["params"] = [*groups[1]["params"], self.head.bias]
        return groups
