"""``hybridssm plot``: the learning curves of training runs (their ``--out`` directories) in a PNG.

Each run directory holds ``metrics.jsonl`` (the records) and ``run.json`` (the settings and the
task's chance level), both written by :func:`hybridssm.training.train`. The figure has two panels:
the training loss, and the held-out metric (accuracy with the chance line, or the loss of a
regression task), one line per run; the title names the settings the runs share.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hybridssm.training import METRICS_FILE, RUN_FILE, read_metrics

__all__ = ["plot_runs", "read_run"]

log = logging.getLogger(__name__)


def read_run(run: str | os.PathLike) -> dict[str, Any]:
    """``{"name", "info", "history"}`` of one run directory; a clear error when it is not one."""
    run = Path(run)
    if not (run / METRICS_FILE).is_file() or not (run / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a training run: it needs {METRICS_FILE} and {RUN_FILE} "
                                "(the --out directory of `hybridssm train`)")
    try:
        info = json.loads((run / RUN_FILE).read_text())
        steps, chance = info["config"]["steps"], info.get("chance")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{run / RUN_FILE} is not a run description ({exc})") from exc
    # A file edited by hand: the values the figure uses, checked here rather than deep in matplotlib.
    if type(steps) is not int or not (chance is None or type(chance) in (int, float)):
        raise ValueError(f"{run / RUN_FILE} is not a run description: config.steps must be an "
                         f"integer and chance a number or null, got {steps!r} and {chance!r}")
    history = read_metrics(run / METRICS_FILE)
    last = history[-1]["step"] if history else 0
    if last < info["config"]["steps"]:
        log.warning("%s has not finished (step %d of %d): plotting what it has", run, last,
                    info["config"]["steps"])
    return {"name": run.resolve().name, "info": info, "history": history}


def _setup(configs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The title (settings shared by every run) and each run's distinguishing label."""
    keys = ["model", "model_options", "task", "task_options", "steps", "batch_size", "lr", "seed"]
    shared = [k for k in keys if all(c.get(k) == configs[0].get(k) for c in configs)]
    own = [k for k in keys if k not in shared]

    def show(k: str, v: Any) -> str:
        if isinstance(v, dict):
            return " ".join(f"{a}={b}" for a, b in v.items()) or "defaults"
        return str(v) if k in ("model", "task") else f"{k} {v}"

    title = ", ".join(show(k, configs[0][k]) for k in shared if configs[0].get(k) not in ({}, None))
    labels = [", ".join(show(k, c.get(k)) for k in own) for c in configs]
    return title, labels


def plot_runs(runs: list[str | os.PathLike], output: str | os.PathLike | None = None) -> Path:
    """Draw the runs' learning curves into ``output`` (default: ``curves.png`` in the first
    run's directory) and return its path. Needs matplotlib (``pip install hybridssm[plot]``)."""
    if not runs:
        raise ValueError("plot needs at least one run directory")
    data = [read_run(r) for r in runs]  # every run is checked before anything is drawn
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'hybridssm[plot]'") from exc
    output = Path(output) if output is not None else Path(runs[0]) / "curves.png"
    title, labels = _setup([d["info"]["config"] for d in data])
    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4.2))
    regression = all(d["info"].get("regression") for d in data)
    test_key = "test_loss" if regression else "test_acc"
    chances: dict[float, str] = {}  # chance level -> the colour of the first run that has it
    for i, (d, label) in enumerate(zip(data, labels)):
        name = d["name"] + (f" ({label})" if label else "")
        color = f"C{i % 10}"  # one colour per run in both panels
        train = [(r["step"], r["loss"]) for r in d["history"] if "loss" in r]
        test = [(r["step"], r[test_key]) for r in d["history"] if test_key in r]
        if train:  # a marker where a line has a single point (it would not show)
            ax_train.plot(*zip(*train), color=color, marker="o" if len(train) == 1 else "",
                          markersize=3, label=name)
        if test:
            ax_test.plot(*zip(*test), color=color, marker="o", markersize=3, label=name)
        if d["info"].get("chance") is not None and not regression:
            chances.setdefault(round(d["info"]["chance"], 6), color)
    for chance, color in sorted(chances.items()):
        ax_test.axhline(chance, color=color, linestyle="--", linewidth=1, alpha=0.7,
                        label=f"chance ({chance:.3g})")
    ax_train.set(xlabel="training step", ylabel="training loss", title="training")
    ax_test.set(xlabel="training step", title="held out",
                ylabel="held-out loss (mean squared error)" if regression else "held-out accuracy")
    if not regression:
        ax_test.set_ylim(0, 1.02)
    for ax in (ax_train, ax_test):
        ax.grid(alpha=0.3)
        # Below the panel: the labels name each run's settings and would cover the curves.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output
