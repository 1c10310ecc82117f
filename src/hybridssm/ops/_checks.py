"""Shape checks of the ops' arguments, before any backend runs: a wrong shape raises one
``ValueError`` naming the op, the argument, the expected and the actual shape, whichever backend is
selected (the fused kernels index raw memory with these sizes; they check them again in C++).

Usage: name each dimension of the op's layout with one letter and let the first tensor that has it
bind its size::

    check = ShapeCheck("selective_scan")
    check("u", u, "BTD")
    check("A", A, "DN")
    check("state", state, "BDN")  # None (optional arguments) passes

The checks run at every call, streaming steps included, so the passing path is one comparison per
dimension (a few microseconds per op).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["ShapeCheck"]


class ShapeCheck:
    """Checks tensors against named layouts; sizes bind on first sight (see the module docstring)."""

    __slots__ = ("op", "sizes")

    def __init__(self, op: str, **sizes: int) -> None:
        self.op = op
        self.sizes: dict[str, int] = dict(sizes)

    def __call__(self, name: str, t: Tensor | None, dims: str) -> None:
        """Check ``t`` (argument ``name``) against ``dims``, one letter per dimension (``"BTHK"``);
        ``None`` passes."""
        if t is None:
            return
        shape = t.shape
        if len(shape) == len(dims):
            sizes = self.sizes
            for dim, size in zip(dims, shape):
                if sizes.setdefault(dim, size) != size:
                    break
            else:
                return
        expected = ", ".join(f"{d}={self.sizes[d]}" if d in self.sizes else d for d in dims)
        raise ValueError(
            f"{self.op}: {name} must have shape [{', '.join(dims)}] = [{expected}], got {list(shape)}"
        )

    def require(self, ok: bool, message: str) -> None:
        """Raise ``ValueError(f"{op}: {message}")`` unless ``ok`` (for constraints between sizes)."""
        if not ok:
            raise ValueError(f"{self.op}: {message}")
