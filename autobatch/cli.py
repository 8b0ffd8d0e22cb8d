"""Command line: ``autobatch probe DATA ...``. Thin: parse, call the public API, render."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from autobatch import AutobatchError, __version__, plan, plan_size_aware
from autobatch._child import QUIET_TF_LOG_LEVEL


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def _buckets(text: str) -> int | tuple[int, ...]:
    parts = _sizes(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a bucket count or boundaries such as 64,256,1024, got {text!r}")
    return parts[0] if "," not in text else parts


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobatch", description="Measure the memory of Keras training and plan a batch size that fits."
    )
    parser.add_argument("--version", action="version", version=f"autobatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser(
        "probe",
        help="measure data, preprocessing and a training step; print the plan",
        description="Measure bytes per sample after preprocessing (random and worst-case batch) and, with "
        "--model, real training-step memory in a child process; then plan the largest safe batch size.",
    )
    probe.add_argument(
        "data", help="CSV/Parquet file, directory or glob of shard files (0.csv, 1.csv, ...), or module:function"
    )
    probe.add_argument("--target", action="append", help="target column (repeat for several)")
    probe.add_argument("--preprocess", help="module:function or file.py:function (batch_x, batch_y) -> (inputs, targets)")
    probe.add_argument("--model", help="a .keras file, or module:function returning a compiled model")
    probe.add_argument("--ram-limit", help="peak host RAM for training, e.g. 8GiB (default: free RAM, cgroup-capped)")
    probe.add_argument("--gpu-limit", help="device memory per replica, e.g. 16GiB (default: free GPU memory)")
    probe.add_argument(
        "--safety", type=_fraction, default=None,
        help="margin kept free on top of what training adds (the step's growth, queue, preprocessing, shards "
        "read), as a fraction of it (default 0.1: 10%%), the same rule as autobatch.fit",
    )
    probe.add_argument("--max-batch-size", type=_positive_int)
    probe.add_argument("--multiple-of", type=_positive_int, help="round the batch size down to a multiple of N")
    probe.add_argument("--sample-batch-size", type=_positive_int, default=32)
    probe.add_argument("--trial-batch-sizes", type=_sizes, help="comma-separated batch sizes of the real trials")
    probe.add_argument("--no-confirm", action="store_true", help="skip the confirming trial at the planned size")
    probe.add_argument("--no-cache", action="store_true", help="measure again even if a cached probe matches")
    probe.add_argument(
        "--size-aware",
        action="store_true",
        help="plan one batch size per length bucket (a grid of trials over batch × padded length; needs --model)",
    )
    probe.add_argument(
        "--buckets",
        type=_buckets,
        help="with --size-aware: the number of length buckets (default 8) or comma-separated boundaries, e.g. 64,256,1024",
    )
    probe.add_argument(
        "--sequence-columns", type=_names, help="with --size-aware: the sequence columns (default: detected)"
    )
    probe.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    probe.add_argument(
        "--debug", action="store_true", help="show tracebacks, debug logs and TensorFlow's C++ start-up logging"
    )
    report = commands.add_parser(
        "report",
        help="summarise a MemoryMonitor log (log_path=...) and plot it",
        description="Render the memory summary of a run from its MemoryMonitor JSON-lines log and, where "
        "matplotlib is installed (pip install 'autobatch[plot]'), save a PNG of memory over time.",
    )
    report.add_argument("log", help="the JSON-lines file written by MemoryMonitor(log_path=...)")
    report.add_argument("--png", help="where to save the plot (default: LOG with .png)")
    report.add_argument("--no-plot", action="store_true", help="only print the summary")
    return parser


def _report(args: argparse.Namespace, console: Console) -> int:
    from autobatch._readings import plot_log, summary_from_log

    try:
        summary, records, header = summary_from_log(args.log)
    except (OSError, ValueError) as exc:
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error", "bold red"), f": {exc}"))
        return 1
    console.print(summary)
    if args.no_plot:
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("matplotlib is not installed: pip install 'autobatch[plot]' to save a plot.")
        return 0
    out = plot_log(records, header, args.png or str(args.log).rsplit(".", 1)[0] + ".png")
    console.print(f"plot saved to {out}")
    return 0


def _tensorflow_logging(debug: bool) -> None:
    # TensorFlow reads the level once, as it loads: set it before this process or a probe child imports it.
    if debug:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)


def main(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    """Run the CLI; returns (and exits with) 0 on success, 1 on an autobatch error, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    _tensorflow_logging(getattr(args, "debug", False))
    console = console or Console()
    if args.command == "report":
        return _exit(_report(args, console), argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    target = None if not args.target else (args.target[0] if len(args.target) == 1 else args.target)
    probe_options = {"sample_batch_size": args.sample_batch_size}
    if args.trial_batch_sizes:
        probe_options["trial_batch_sizes"] = args.trial_batch_sizes
    ignored = (
        [("--multiple-of", args.multiple_of is not None), ("--no-cache", args.no_cache)]
        if args.size_aware
        else [("--buckets", args.buckets is not None), ("--sequence-columns", args.sequence_columns is not None)]
    )
    for flag, given in ignored:
        if given:
            mode = "with --size-aware" if args.size_aware else "without --size-aware"
            Console(stderr=True, soft_wrap=True).print(f"autobatch: warning: {flag} has no effect {mode}", highlight=False)
    if args.size_aware:
        return _exit(_size_aware(args, target, probe_options, console), argv)
    try:
        result = plan(
            args.data,
            target,
            preprocess=args.preprocess,
            model=args.model,
            ram_limit=args.ram_limit,
            gpu_limit=args.gpu_limit,
            safety=args.safety,
            max_batch_size=args.max_batch_size,
            multiple_of=args.multiple_of,
            confirm=not args.no_confirm,
            cache=not args.no_cache,
            in_process=False,
            **probe_options,
        )
    except AutobatchError as exc:
        if args.debug:
            raise
        _print_error(exc)
        return _exit(1, argv)
    if args.json:
        print(json.dumps(result.to_dict()), file=console.file)
    else:
        console.print(result.probe)
        console.print(result)
    return _exit(0, argv)


def _size_aware(args: argparse.Namespace, target: object, probe_options: dict[str, object], console: Console) -> int:
    options = dict(probe_options)
    options.pop("trial_batch_sizes", None)
    if args.trial_batch_sizes:
        options["grid_batch_sizes"] = args.trial_batch_sizes
    try:
        result = plan_size_aware(
            args.data,
            target,
            preprocess=args.preprocess,
            model=args.model,
            ram_limit=args.ram_limit,
            gpu_limit=args.gpu_limit,
            safety=args.safety,
            max_batch_size=args.max_batch_size,
            buckets=8 if args.buckets is None else args.buckets,
            sequence_columns=args.sequence_columns,
            confirm=not args.no_confirm,
            in_process=False,
            **options,
        )
    except AutobatchError as exc:
        if args.debug:
            raise
        _print_error(exc)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()), file=console.file)
    else:
        console.print(result.sized)
        console.print(result)
    return 0


def _print_error(exc: AutobatchError) -> None:
    error = Text.assemble((type(exc).__name__, "bold red"), ": ", str(exc))
    Console(stderr=True, soft_wrap=True).print(error, highlight=False)


def _exit(code: int, argv: Sequence[str] | None) -> int:
    # Called as a console script (argv None): exit with the code; called from Python: return it.
    if argv is None:
        sys.exit(code)
    return code
