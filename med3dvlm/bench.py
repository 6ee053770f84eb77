"""``python -m med3dvlm.bench [--quick] [--only SECTION ...] [--reference PATH]``: measure this
machine, print a table (``--only import``: the 7B import's peak memory and time). With
``--reference`` (a checkout of the original, mirthAI/Med3DVLM) the encoder and projector rows also
time the original beside ours, interleaved in this process; the table has an "original" column only
then."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from med3dvlm.benchmarks import ON_REQUEST, SECTIONS, BenchOptions, BenchRow, bench_table, section_module


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes where noted")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=SECTIONS + ON_REQUEST,
        help="run only these sections (import: only when named; it needs ~46 GB of temporary disk)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="PATH",
        help="a checkout of the original (mirthAI/Med3DVLM) to time beside ours; its code runs here",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.reference is not None and not args.reference.is_dir():
        parser.error(f"--reference {args.reference}: not a folder")
    options = BenchOptions(quick=args.quick, reference=args.reference)
    rows: list[BenchRow] = []
    for section in args.only or SECTIONS:
        rows.extend(importlib.import_module(section_module(section)).run(options))
    print(bench_table(rows))


if __name__ == "__main__":
    main()
