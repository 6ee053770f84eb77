"""``python -m med3dvlm.bench [--quick] [--only SECTION ...]``: measure this machine, print a table."""

from __future__ import annotations

import argparse
import importlib

from med3dvlm.benchmarks import SECTIONS, BenchRow


def format_table(rows: list[BenchRow]) -> str:
    """Markdown table of benchmark rows."""
    lines = [
        "| section | measurement | ours | unit | original | note |",
        "|---|---|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.section} | {r.name} | {r.value:.3g} | {r.unit} | {r.original} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes where noted")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    rows: list[BenchRow] = []
    for section in args.only or SECTIONS:
        module = importlib.import_module(f"med3dvlm.benchmarks.{section}")
        rows.extend(module.run(quick=args.quick))
    print(format_table(rows))


if __name__ == "__main__":
    main()
