"""Pure tensor functions ``(inputs, state) -> (out, final_state)``.

Each recurrence has a ``*_ref`` twin beside its fast form: a plain loop over time, accumulating in
the wider of fp32 and the input dtype. ``_kernels`` picks the implementation in one place.

Notation (every op states its layout in its docstring):

====  ==========================================
B     batch
T     time (sequence length)
D     channels of a stream ``[B, T, D]``
C     channels of a causal conv (``[B, C, K-1]`` state)
K     conv kernel width, or key head width
V     value head width
H     heads (``[B, T, H, K]`` per-head streams)
N     SSM state size (Mamba: ``[B, D, N]``; Mamba-2: ``[B, H, P, N]``)
P     Mamba-2 head width
Q     chunk length of a chunked form
====  ==========================================
"""

from hybridssm.ops._kernels import current_backend, kernels, use_kernels

__all__ = ["current_backend", "kernels", "use_kernels"]
