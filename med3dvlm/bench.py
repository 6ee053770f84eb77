"""``python -m med3dvlm.bench [--quick] [--only SECTION ...] [--reference PATH]``: measure this
machine, print a table. With ``--reference`` (a checkout of the original, mirthAI/Med3DVLM) the
encoder and projector rows also time the original beside ours, interleaved in this process; the
table has an "original" column only then."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from med3dvlm.benchmarks import SECTIONS, BenchOptions, BenchRow
from med3dvlm.utils.markdown import markdown_table


def bench_table(rows: list[BenchRow]) -> str:
    """Markdown table of benchmark rows; the original's columns only where some row has them."""
    side_by_side = any(r.original is not None for r in rows)
    header = ["section", "measurement", "ours", "unit", *(["original", "ours / original"] if side_by_side else []), "note"]
    cells = []
    for r in rows:
        row = [r.section, r.name, f"{r.value:.3g}", r.unit]
        if side_by_side:
            row += ["" if r.original is None else f"{r.original:.3g}", "" if r.ratio is None else f"{r.ratio:.2f}"]
        cells.append([*row, r.note])
    return markdown_table(header, cells, right=[2, 4, 5] if side_by_side else [2])


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes where noted")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--reference", type=Path, metavar="PATH",
                        help="a checkout of the original (mirthAI/Med3DVLM) to time beside ours; its code runs here")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.reference is not None and not args.reference.is_dir():
        parser.error(f"--reference {args.reference}: not a folder")
    options = BenchOptions(quick=args.quick, reference=args.reference)
    rows: list[BenchRow] = []
    for section in args.only or SECTIONS:
        rows.extend(importlib.import_module(f"med3dvlm.benchmarks.{section}").run(options))
    print(bench_table(rows))


if __name__ == "__main__":
    main()
