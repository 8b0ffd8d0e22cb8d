"""autobatch benchmarks: ratios measured side by side, in one run, on this machine.

Usage::

    ./dev bench                                  # all eight, full size (about 15–20 minutes on 2 cores)
    ./dev bench feed planning                    # only these
    ./dev bench --quick                          # a smoke run of everything, tiny sizes
    ./dev bench --markdown BENCHMARKS.md         # also write the results block into that file
    ./dev bench --json results.json              # and/or as JSON

Benchmarks (issue 6): feed, shards, tutorial, planning, memory, probe, padding; (issue 9): sizeaware; (issue 18): stability; (issue 20): models.
See BENCHMARKS.md for what each one measures and the last results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import workload  # noqa: E402
from measure import machine  # noqa: E402

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(cases.BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run")
    parser.add_argument("--reps", type=int, help="interleaved repetitions of every timed comparison")
    parser.add_argument("--markdown", type=Path, help="write the results block into this Markdown file")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in cases.BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(cases.BENCHMARKS)}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1. Received: {args.reps}")
    return args


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown(rows: list[cases.Row], info: dict[str, str], command: str, seconds: float) -> str:
    """The results block: command, machine, and one table row per measurement."""
    lines = [
        f"Command: `{command}` ({seconds / 60:.1f} min)",
        "",
        *[f"- **{key}**: {value}" for key, value in info.items()],
        "",
        "| benchmark | measurement | result | target | met | how |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        cells = [row.benchmark, row.measurement, row.formatted_value(), str(row.target or ""), met, row.detail]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_block(path: Path, block: str) -> None:
    """Replace the results block between the markers in ``path`` (append one if there is none)."""
    text = path.read_text() if path.exists() else ""
    wrapped = f"{BEGIN}\n{block}{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: wrapped, text, flags=re.S)
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + wrapped + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sizes = workload.QUICK if args.quick else workload.FULL
    if args.reps is not None:
        sizes = dataclasses.replace(sizes, reps=args.reps, target_reps=args.reps)
    names = args.names or list(cases.BENCHMARKS)
    command = "./dev bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    info = machine()
    started = time.perf_counter()
    ctx = cases.Context(sizes, log=_log)
    rows: list[cases.Row] = []
    try:
        if args.quick:
            ctx.prefetch(names)
        for name in names:
            _log(f"== {name}")
            begun = time.perf_counter()
            rows += cases.BENCHMARKS[name](ctx)
            _log(f"== {name} took {time.perf_counter() - begun:.0f} s")
    finally:
        ctx.close()
    seconds = time.perf_counter() - started
    block = markdown(rows, info, command.strip(), seconds)
    print(block, end="")
    if args.quick:
        print("(--quick: tiny sizes for a smoke run; the ratios mean nothing)")
    if args.markdown is not None:
        write_block(args.markdown, block)
    if args.json is not None:
        payload = {"command": command.strip(), "seconds": seconds, "machine": info, "quick": args.quick}
        payload["results"] = [row.to_dict() for row in rows]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
