"""The ``hybridssm`` command: ``list``, ``info``, ``train``, ``plot``, ``bench``, ``demo``.

Model options come from the model's config dataclass: every field ``name`` is ``--name-with-dashes
VALUE`` (or ``--opt name=VALUE``); booleans also take ``--name`` / ``--no-name``. Values are read as
JSON when they parse (``64``, ``0.1``, ``true``, ``[0, 3]``, ``{"num_heads": 2}``), else as text
(``--backbone mamba``); the config validates them and its message is printed as is (exit code 2).
``--import MODULE`` imports a module first (custom backbones registering themselves); backbones
published in the entry-point group ``hybridssm.backbones`` are loaded automatically.

Messages go through :mod:`logging` (logger ``hybridssm``, to stderr; ``--quiet`` keeps warnings
and errors, ``--verbose`` adds debug lines); results (tables, the final JSON of ``train``) go to
stdout. Exit codes: 0 done, 2 bad input or a file that cannot be read or written, 3 training
diverged, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

PROG = "hybridssm"
log = logging.getLogger("hybridssm")


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


# -- model options from the config dataclass ------------------------------------------------------
def _config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_bool(f: dataclasses.Field) -> bool:
    return _type_name(f) in ("bool", "bool | None") or isinstance(_default(f), bool)


def parse_value(text: str, f: dataclasses.Field) -> Any:
    """Read one option value for field ``f`` (see the module docstring)."""
    kind = _type_name(f)
    low = text.strip().lower()
    if low in ("none", "null") and "None" in kind:
        return None
    if _is_bool(f) and low in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return low in ("true", "yes", "on", "1")
    if kind == "str":
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value  # configs hold tuples


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_model_options(model: str, extras: Sequence[str], opts: Sequence[str], own: Sequence[str],
                        config_class: type | None = None) -> dict[str, Any]:
    """Model options from the leftover arguments (``--name value``) and ``--opt name=value``.

    ``own``: the sub-command's own flags, offered in "did you mean" suggestions too;
    ``config_class``: the model's config class, when the caller has looked it up already.
    """
    from hybridssm.config import suggest
    from hybridssm.registry import get_config_class

    fields = _config_fields(config_class or get_config_class(model))
    flags = {_flag(n): n for n in fields}
    result: dict[str, Any] = {}

    def unknown(token: str) -> UsageError:
        hint = suggest(token, [*flags, *own, *(f"--no-{n[2:]}" for n, k in flags.items()
                                                 if _is_bool(fields[k]))])
        return UsageError(
            f"unknown option {token} for model {model!r}{hint}; its options are: "
            f"{', '.join(sorted(flags))} (see `{PROG} info {model}`)"
        )

    i, extras = 0, list(extras)
    while i < len(extras):
        token = extras[i]
        if not token.startswith("--"):
            raise UsageError(f"unexpected argument {token!r} (options look like --hidden-size 64)")
        name, eq, value = token.partition("=")
        if name.startswith("--no-") and name not in flags and "--" + name[5:] in flags \
                and _is_bool(fields[flags["--" + name[5:]]]) and not eq:
            result[flags["--" + name[5:]]] = False
            i += 1
            continue
        if name not in flags:
            raise unknown(name)
        field = fields[flags[name]]
        if not eq:
            nxt = extras[i + 1] if i + 1 < len(extras) else None
            if nxt is None or (nxt.startswith("--") and _is_bool(field)):
                if not _is_bool(field):
                    raise UsageError(f"option {name} needs a value")
                result[field.name] = True
                i += 1
                continue
            value, i = nxt, i + 1
        result[field.name] = parse_value(value, field)
        i += 1
    for item in opts:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise UsageError(f"--opt takes name=value, got {item!r}")
        if key not in fields:
            raise unknown(_flag(key))
        result[key] = parse_value(value, fields[key])
    return result


def parse_task_options(task: str, items: Sequence[str]) -> dict[str, Any]:
    from hybridssm.config import suggest
    from hybridssm.tasks import TASKS, list_tasks

    if task not in TASKS:
        raise UsageError(f"--task: unknown task {task!r}{suggest(str(task), TASKS)}; available: "
                         f"{', '.join(list_tasks())}")
    fields = {f.name: f for f in dataclasses.fields(TASKS[task])}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise UsageError(f"--task-opt takes name=value, got {item!r}")
        out[key] = parse_value(value, fields[key]) if key in fields else value
    return out  # unknown names are reported by the task's own from_options


# -- plugins --------------------------------------------------------------------------------------
def load_plugins(modules: Sequence[str]) -> None:
    """Import ``--import`` modules (found on ``sys.path`` or in the current directory) and the
    ``hybridssm.backbones`` entry points."""
    from importlib.metadata import entry_points

    from hybridssm.backbones import register_backbone

    for ep in entry_points(group="hybridssm.backbones"):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type(sys)):
                register_backbone(ep.name, obj)
        except Exception as exc:  # a broken plugin must not break the command
            log.warning("backbone entry point %r failed to load: %s", ep.name, exc)
    if modules:
        # The installed `hybridssm` script, unlike `python -m hybridssm`, does not search the
        # current directory, where a user's module usually is; searched last, it shadows nothing.
        cwd = os.getcwd()
        if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
            sys.path.append(cwd)
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise UsageError(f"--import {mod}: {exc} (searched the current directory and "
                             "sys.path)") from exc


# -- sub-commands ---------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace, extras: list[str]) -> int:
    from hybridssm.backbones import list_backbones
    from hybridssm.registry import get_model_class, list_models
    from hybridssm.tasks import TASKS

    _no_extras(extras)
    print("models (see: hybridssm info MODEL):")
    for name in list_models():
        print(f"  {name:<16} {summary(sys.modules[get_model_class(name).__module__].__doc__)}")
    print("backbones of the hybrid model (--backbone NAME):")
    print("  " + ", ".join(list_backbones()))
    print("tasks (hybridssm train MODEL --task NAME; your own arrays: --data FILE):")
    for name, cls in sorted(TASKS.items()):
        print(f"  {name:<16} {summary(sys.modules[cls.__module__].__doc__)}")
    return 0


def summary(doc: str | None) -> str:
    """The first sentence of a docstring as plain text: no reST markup, no seed numbers."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    text = re.sub(r"^``[^`]+``:\s*", "", text)  # a leading "``name``:" repeats the name
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    text = re.sub(r"\s*\((?:seeds?|seed's) [^)]*\)", "", text)  # references to internal sources
    text = re.sub(r"\(seeds? [\d/ ]+;\s*", "(", text)
    text = re.sub(r",? the seed's [^.,;]*", "", text)
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)[0]
    return first[:1].upper() + first[1:]


def _state_bytes(state: Any) -> tuple[int, list[str]]:
    from torch.utils import _pytree as pytree

    leaves = [t for t in pytree.tree_leaves(state) if hasattr(t, "element_size")]
    total = sum(t.numel() * t.element_size() for t in leaves)
    return total, [f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in leaves]


def _model_options(args: argparse.Namespace, extras: list[str]) -> tuple[type, dict[str, Any], bool]:
    """(config class, options with embed_dim filled in, whether embed_dim was given): the class is
    looked up once; the options are validated by building the config once, without weights."""
    from hybridssm.registry import get_config_class
    from hybridssm.training import with_embed_dim

    config_class = get_config_class(args.model)
    opts = parse_model_options(args.model, extras, args.opt, args.own_flags, config_class)
    given = "embed_dim" in opts
    return config_class, with_embed_dim(config_class, opts), given


def cmd_info(args: argparse.Namespace, extras: list[str]) -> int:
    import hybridssm as hs
    from hybridssm.registry import get_model_class

    config_class, opts, given_embed = _model_options(args, extras)
    config = config_class.from_options(**opts)  # validates (ValueError / TypeError)
    model = get_model_class(args.model)(config)  # built once: parameters, pattern, state
    print(f"{args.model}  ({config_class.__name__})")
    print("options (--name value, or --opt name=value)"
          + ("" if given_embed else "; embed_dim not given: shown with embed_dim = hidden_size "
             "(no input projection)") + ":")
    for name, f in _config_fields(config_class).items():
        d = _default(f)
        default = "required" if d is dataclasses.MISSING else repr(d)
        now = getattr(config, name)
        mark = "" if d is not dataclasses.MISSING and now == d else f"  -> {now!r}"
        print(f"  {_flag(name):<28} {_type_name(f):<22} default {default}{mark}")
    rec = hs.recommended_defaults(args.model)
    if rec:
        print(f"recommended defaults (the seeds'): {rec}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    pattern = _layer_pattern(model, config)
    if pattern:
        print(f"layer pattern: {list(pattern)}")
    state = model.init_state(1)
    total, parts = _state_bytes(state)
    cap = model.state_max_len(state)
    print(f"state at batch 1: {total:,} bytes ({len(parts)} tensors"
          + (f"; full attention sized for max_len={cap})" if cap is not None else ")"))
    return 0


def _layer_pattern(model: Any, config: Any) -> list | None:
    """The model's layer kinds, when it exposes them (hybrids: data, DESIGN §2)."""
    import hybridssm as hs

    for obj in (model, config):
        for attr in ("layer_pattern", "layer_kinds", "block_types"):
            value = getattr(obj, attr, None)
            value = value() if callable(value) else value
            if isinstance(value, (list, tuple)) and value:
                return list(value)
    if hasattr(config, "attention_every") and callable(getattr(hs, "layer_pattern", None)):
        return list(hs.layer_pattern(num_layers=config.num_layers, attention_every=config.attention_every))
    return None


def cmd_train(args: argparse.Namespace, extras: list[str]) -> int:
    import os

    from hybridssm.registry import get_config_class
    from hybridssm.training import MODEL_DIR, TrainConfig, train

    model_opts = parse_model_options(args.model, extras, args.opt, args.own_flags,
                                     get_config_class(args.model))
    if args.data is not None:
        if args.task is not None:
            raise UsageError("--data and --task exclude each other (--data trains on your arrays)")
        if args.task_opt:
            raise UsageError("--task-opt is for the synthetic tasks; with --data use --val-fraction")
        task, task_opts = "data", {"path": args.data, "val_fraction": args.val_fraction}
    else:
        task = args.task or "mqar"
        task_opts = parse_task_options(task, args.task_opt)
    config = TrainConfig(
        model=args.model, model_options=model_opts, task=task, task_options=task_opts,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, bf16=args.bf16, eval_every=args.eval_every,
        eval_size=args.eval_size, seed=args.seed, log_every=args.log_every,
        checkpoint_every=args.save_every, device=args.device,
        progress=False if args.no_progress else None, progress_every=args.progress_every,
        max_nonfinite=args.max_nonfinite, ddp_timeout=args.ddp_timeout,
    )
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports and saves
    if args.out is None and lead:
        log.warning("no --out directory: nothing will be kept (metrics, checkpoints, the trained "
                    "model); pass --out DIR to keep them")
    res = train(config, out=args.out, resume=args.resume, stop_after=args.stop_after,
                quiet=args.quiet, tensorboard=args.tensorboard)
    if not lead:
        return 0
    if res.train_tokens_per_s is None:
        log.info("the run had already finished at step %d: nothing left to train", config.steps)
    if args.out is not None and res.final.get("step") == config.steps:
        log.info("saved the trained model in %s/%s (hs.load; .backbone for the backbone alone)",
                 args.out, MODEL_DIR)
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.final.items()}
    if res.train_tokens_per_s is not None:
        final["train_tok_s"] = round(res.train_tokens_per_s, 1)
    print(json.dumps(final))
    return 0


def cmd_plot(args: argparse.Namespace, extras: list[str]) -> int:
    from hybridssm.plot import plot_runs

    _no_extras(extras)
    path = plot_runs(args.runs, args.output)
    log.info("wrote %s", path)
    return 0


def cmd_bench(args: argparse.Namespace, extras: list[str]) -> int:
    import torch

    from hybridssm.bench import SHAPES, BenchSettings, bench_model, format_table, machine_rates

    config_class, opts, _ = _model_options(args, extras)
    config_class.from_options(**opts)  # validate before measuring anything
    if args.batch is not None or args.length is not None:
        shapes = [(args.batch or 32, args.length or 60)]
    else:
        shapes = SHAPES[args.shape]
    settings = BenchSettings(max_time=args.max_time, max_iters=args.max_iters,
                             latency_steps=args.latency_steps, memory=not args.no_memory)
    rates = machine_rates(args.device, seconds=0.3)
    print(f"# {PROG} bench {args.model} {opts}")
    print(f"threads {torch.get_num_threads()}, device {args.device}, torch {torch.__version__}; "
          f"measured ceilings: GEMM {rates['gemm_gflops']:.1f} GFLOP/s, exp {rates['exp_gelems']:.2f} "
          "G elem/s")
    print(f"timing: {settings.warmup} warm-up, median of up to {settings.max_iters} iterations or "
          f"{settings.max_time} s, model and baseline interleaved; step latency: batch 1, inplace, "
          f"median of {settings.latency_steps}; peak memory: own subprocess\n")
    rows = []
    for shape in shapes:
        rows += bench_model(args.model, opts, shape, settings=settings, device=args.device,
                            baseline=not args.no_baseline, imports=args.imports)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "options": opts, "rates": rates,
                       "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)
    return 0


def cmd_demo(args: argparse.Namespace, extras: list[str]) -> int:
    from hybridssm.demo import run_demo

    _no_extras(extras)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    run_demo(quick=args.quick, models=models, out=args.out,
             progress=False if args.no_progress else None)
    return 0


def _no_extras(extras: list[str]) -> None:
    if extras:
        raise UsageError(f"unrecognized arguments: {' '.join(extras)}")


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: ``train --out`` keeps its last checkpoint."""
    if args.command != "train" or getattr(args, "out", None) is None:
        return ""
    return (f"; {args.out} keeps the last checkpoint: run the same command with --resume to "
            "continue")


# -- the parser -----------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the help states it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not argparse.SUPPRESS
                and action.nargs != 0):
            shown = "none" if action.default in (None, []) else "%(default)s"
            text += f" (default: {shown})"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import hybridssm

    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = "not installed"
    return f"{PROG} {hybridssm.__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


class _Parser(argparse.ArgumentParser):
    """The top-level parser: a mistyped command gets a "did you mean" like every other name."""

    def error(self, message: str):
        typo = re.search(r"argument COMMAND: invalid choice: '([^']*)'", message)
        commands = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
        if typo and commands:
            from hybridssm.checks import suggest

            message = (f"unknown command {typo.group(1)!r}{suggest(typo.group(1), commands)}; "
                       f"commands: {', '.join(commands)}")
        super().error(message)


class _VersionAction(argparse.Action):
    """``--version``; the version is read only when asked (importing the package imports torch,
    which every other command, --help included, should not pay for before it needs it)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_version())
        parser.exit()


def _own_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` (its flags offered in "did you mean" suggestions)."""
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def build_parser() -> argparse.ArgumentParser:
    def common_options(sub: bool) -> argparse.ArgumentParser:
        # Accepted before and after the sub-command; a sub-parser's defaults are suppressed so
        # that they never overwrite a value given before the sub-command.
        c = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        dflt = (lambda v: argparse.SUPPRESS) if sub else (lambda v: v)
        c.add_argument("--import", dest="imports", action="append", default=dflt([]), metavar="MODULE",
                       help="import MODULE first (e.g. one that registers a custom backbone; default: none)")
        c.add_argument("--threads", type=int, default=dflt(None),
                       help="torch CPU threads (default: torch's choice)")
        c.add_argument("--traceback", action="store_true", default=dflt(False),
                       help="show the traceback of an error")
        c.add_argument("-q", "--quiet", action="store_true", default=dflt(False),
                       help="only warnings and errors (no progress bar, no progress lines)")
        c.add_argument("-v", "--verbose", action="store_true", default=dflt(False),
                       help="also debug messages")
        return c

    common, common_sub = common_options(False), common_options(True)

    p = _Parser(prog=PROG, description="Hybrid SSM + attention backbones: inspect, "
                                "train on synthetic tasks or your own data, plot, benchmark, demo.",
                                parents=[common], allow_abbrev=False, formatter_class=_HelpFormatter)
    p.add_argument("--version", action=_VersionAction, help="print the versions and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common_sub], allow_abbrev=False,
                              formatter_class=_HelpFormatter)

    def done(s: argparse.ArgumentParser, func) -> None:
        s.set_defaults(func=func, own_flags=_own_flags(s))

    s = add("list", "list the registered models, hybrid backbones and tasks")
    done(s, cmd_list)

    model_help = "model options: --name value for each field of the model's config (see `info`)"
    s = add("info", "a model's options and defaults, parameter count, layer pattern, state size")
    s.add_argument("model", help="a registered model (see `list`)")
    s.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help=model_help)
    done(s, cmd_info)

    s = add("train", "train a model on a synthetic task or your own arrays (checkpoints, resume, "
                     "torchrun for DDP)")
    s.add_argument("model", help="a registered model (see `list`)")
    s.add_argument("--task", default=None, help="mqar | selective_copy | parity (default: mqar)")
    s.add_argument("--task-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="task option, e.g. --task-opt num_kv_pairs=8")
    s.add_argument("--data", default=None, metavar="FILE",
                   help="train on your arrays: .npz/.safetensors/.pt with x [N, T, E], optional y, lengths")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="with --data: share of the sequences held out for evaluation")
    s.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help=model_help)
    s.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    s.add_argument("--batch-size", type=int, default=32, help="global batch (split over processes)")
    s.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    s.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    s.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up of the learning rate (default: steps / 10, at most 100)")
    s.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    s.add_argument("--bf16", action="store_true", help="bf16 autocast")
    s.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on the held-out set every N steps (default: steps / 10)")
    s.add_argument("--eval-size", type=int, default=512, help="held-out sequences evaluated")
    s.add_argument("--seed", type=int, default=0, help="model init, dropout and data order")
    s.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl training record")
    s.add_argument("--save-every", type=int, default=0, help="checkpoint period (0: at evaluations)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="directory for metrics.jsonl, checkpoint.pt, run.json, model/")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out (starts it when it has no checkpoint yet)")
    s.add_argument("--stop-after", type=int, default=None, help="stop at this step (resume later)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--progress-every", type=int, default=100,
                   help="without a terminal: one progress log line every N steps (0: none)")
    s.add_argument("--max-nonfinite", type=int, default=0,
                   help="steps with a non-finite loss that may be skipped before the run stops (exit 3)")
    s.add_argument("--ddp-timeout", type=float, default=10.0,
                   help="minutes a process waits for the others under torchrun")
    s.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log metrics to TensorBoard in DIR (pip install 'hybridssm[tensorboard]')")
    done(s, cmd_train)

    s = add("plot", "draw the learning curves of training runs into a PNG")
    s.add_argument("runs", nargs="+", metavar="RUN", help="--out directories of `train`")
    s.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="the PNG to write (default: curves.png in the first run's directory)")
    done(s, cmd_plot)

    s = add("bench", "throughput, step latency and memory beside nn.TransformerEncoder")
    s.add_argument("model", help="a registered model (see `list`)")
    s.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help=model_help)
    s.add_argument("--shape", choices=["short", "long"], default="short",
                   help="short = (32, 60); long = 8,192 tokens at T = 256, 2048, 4096")
    s.add_argument("--batch", type=int, default=None, help="batch size (overrides --shape)")
    s.add_argument("--length", type=int, default=None, help="sequence length (overrides --shape)")
    s.add_argument("--latency-steps", type=int, default=1000, help="steps timed for the step latency")
    s.add_argument("--max-time", type=float, default=3.0, help="seconds per candidate")
    s.add_argument("--max-iters", type=int, default=20, help="iterations per candidate, at most")
    s.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    s.add_argument("--no-baseline", action="store_true", help="skip nn.TransformerEncoder")
    s.add_argument("--device", default="cpu", help="torch device")
    s.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    done(s, cmd_bench)

    s = add("demo", "train the model zoo on MQAR, print a leaderboard, write results/demo.*")
    s.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    s.add_argument("--models", default=None, help="comma-separated zoo entries (default: all registered)")
    s.add_argument("--out", default="results", help="directory for demo.md, demo.json, demo.png")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    done(s, cmd_demo)
    return p


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{PROG}: {level}{record.getMessage()}"


def _setup_logging(quiet: bool, verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)  # the stream of this call (tests swap it)
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse's own usage errors (2), --help and --version (0)
        return int(exc.code or 0)
    if args.quiet and args.verbose:
        print(f"{PROG}: error: --quiet and --verbose exclude each other", file=sys.stderr)
        return 2
    level = log.level
    handler = _setup_logging(args.quiet, args.verbose)
    try:
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        load_plugins(args.imports)
        return args.func(args, extras)
    except KeyboardInterrupt:
        if args.traceback:
            raise
        log.error("%s: interrupted%s", args.command, _resume_hint(args))
        return 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
    except (UsageError, ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        from hybridssm.training import DivergenceError

        if args.traceback:
            raise
        if isinstance(exc, RuntimeError) and not isinstance(exc, DivergenceError):
            raise  # a bug, not bad input: keep the traceback
        log.error("%s: %s", args.command, exc)
        return 3 if isinstance(exc, DivergenceError) else 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
