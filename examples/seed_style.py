"""The well-known tutorial's scenario, end to end, with autobatch.fit.

Before (the tutorial): a hand-written ``while True`` generator slicing a DataFrame
by ``i * batch_size``, padding each batch, driven with a guessed ``batch_size``
and ``steps_per_epoch = len(df) // batch_size`` (which silently drops the tail of
every epoch). After: one call that measures, plans, feeds and trains::

    python examples/seed_style.py --ram-limit 1GiB

Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import canonical  # noqa: E402

import autobatch  # noqa: E402


def main(argv: list[str] | None = None) -> object:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ram-limit", default="1GiB")
    parser.add_argument("--log", help="write the memory monitor's JSON-lines log here (see `autobatch report`)")
    parser.add_argument(
        "--batching",
        choices=["fixed", "size-aware"],
        default="fixed",
        help="size-aware: one batch size per length bucket, each padded to its bucket (README: Size-aware batching)",
    )
    args = parser.parse_args(argv)

    frame = canonical.make_frame(args.rows, seed=0)
    split = int(len(frame) * 0.9)
    train, val = frame.iloc[:split], frame.iloc[split:]
    model = canonical.build_model()

    history = autobatch.fit(
        model,
        train.drop(columns=["label"]),
        train["label"],
        preprocess=canonical.preprocess,
        validation_data=(val.drop(columns=["label"]), val["label"]),
        epochs=args.epochs,
        ram_limit=args.ram_limit,
        log_path=args.log,
        batching=args.batching,
    )
    plan = history.autobatch_plan
    sizes = f"batches {min(plan.batch_sizes)}–{max(plan.batch_sizes)}" if args.batching == "size-aware" else None
    print(
        f"trained {args.epochs} epoch(s) at {sizes or f'batch {plan.batch_size}'} ({plan.steps_per_epoch} steps/epoch, "
        f"every sample once per epoch); loss {history.history['loss'][0]:.4f} -> {history.history['loss'][-1]:.4f}, "
        f"val_loss {history.history['val_loss'][-1]:.4f}"
    )
    return history


if __name__ == "__main__":
    main()
