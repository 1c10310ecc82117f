"""Training a backbone on a task (synthetic, or your own arrays: ``task="data"``), single process or
data parallel (torch.distributed).

``train(TrainConfig(model="mamba", task="mqar", ...), out="runs/x")`` trains
:class:`~hybridssm.tasks.TaskModel` (embedding or frames -> backbone -> head) with AdamW (no weight decay
on the parameters the library marks: SSM decays, ``D``, norms; nor on biases), linear warm-up then
cosine decay, gradient clipping and optional bf16 autocast.

Reproducibility is the design constraint:

* Batch ``s`` is a pure function of ``(seed, s)`` (:meth:`hybridssm.tasks.Task.batch`), so the data
  order needs no loader state, and every rank draws the same global batch and keeps its slice.
* A checkpoint holds the model, optimizer, scheduler, the torch / CUDA / numpy / Python RNG states,
  the step and the run's config, written atomically (:func:`hybridssm.io.atomic_write`). ``resume``
  from it continues to bitwise the same parameters and metrics as an uninterrupted run.
* A corrupt checkpoint, or one from another run (different model, task or settings), raises
  :class:`CheckpointError` before anything is modified.

Faults end a run cleanly: a non-finite loss or gradient stops it before the update is applied
(:class:`DivergenceError`, naming the step; ``max_nonfinite`` skips a few such steps instead), and
no checkpoint with non-finite weights is ever written; a failed write (a full disk) raises one
:class:`RunFileError` line; on resume, a torn last ``metrics.jsonl`` line is dropped and the
metrics are cut back to the checkpoint's step; temporary files of killed writes are removed.

Data parallel: launch with ``torchrun --nproc_per_node N -m hybridssm train ...`` (gloo on CPU,
NCCL on GPU), or call :func:`train` in processes that already joined a process group. The loss is
normalised by the *global* number of scored targets, so a run on N processes computes the same
loss and gradients as one process with the same global batch (up to float summation order).

The package: :mod:`~hybridssm.training.config` (the run's settings), :mod:`~hybridssm.training.files`
(checkpoints, metrics, run files) and :mod:`~hybridssm.training.loop` (the loop itself).
"""

from hybridssm.training.config import RUN_ONLY, TrainConfig, build_task_model, lr_factor, with_embed_dim
from hybridssm.training.files import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RUN_FILE,
    CheckpointError,
    RunFileError,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from hybridssm.training.loop import DivergenceError, TrainResult, evaluate, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "CheckpointError",
    "DivergenceError",
    "RunFileError",
    "read_metrics",
    "train",
    "build_task_model",
    "with_embed_dim",
    "evaluate",
    "lr_factor",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "RUN_FILE",
    "MODEL_DIR",
    "RUN_ONLY",
    "save_checkpoint",
    "load_checkpoint",
]
