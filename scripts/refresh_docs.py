"""Rewrite the tables of README.md and docs/ that are made from committed records, so prose never carries a stale one.

A generated table sits between two markers that name its records and the function that makes it:

    <!-- generated: grid_1500 headline_table -->
    ...
    <!-- end generated -->

`grid_1500` is `benchmarks/results/grid_1500.jsonl`; the function is `metaperturb_hf.results.markdown_table`, one of
`benchmarks/grid_summary.py`'s tables, `single_pass_saved_table` or `single_pass_choice_table` (the reports of
`benchmarks/single_pass_saved.py` and `benchmarks/single_pass_choice.py`). After new records:

    python scripts/refresh_docs.py           # rewrite every stale block in place
    python scripts/refresh_docs.py --check   # list the stale blocks and exit 1 if any (tests/test_readme.py does this)

The sentences around a table are not generated: read them again when its numbers move.
"""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from metaperturb_hf.results import load_records, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: (\S+) (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _benchmark(name: str):
    if str(RESULTS.parent) not in sys.path:  # benchmarks import their siblings, as when they run as scripts
        sys.path.insert(0, str(RESULTS.parent))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_makers() -> dict:
    """The functions a block may name: records → markdown."""
    grid_summary = _benchmark("grid_summary")
    makers = {"markdown_table": markdown_table, "single_pass_saved_table": _benchmark("single_pass_saved").report,
              "single_pass_choice_table": _benchmark("single_pass_choice").report}
    for name in ("headline_table", "calibration_table", "gain_table", "single_pass_table", "regularizer_table",
                 "placement_table", "targets_table"):
        makers[name] = getattr(grid_summary, name)
    return makers


def blocks(text: str) -> list[tuple[str, str]]:
    """(records, function) of every generated block of `text`, in order."""
    return [(match[2], match[3]) for match in BLOCK.finditer(text)]


def refreshed(text: str, makers: dict) -> str:
    """`text` with every generated block remade from its records."""
    def remake(match: re.Match) -> str:
        records_name, function = match[2], match[3]
        if function not in makers:
            raise ValueError(f"unknown table {function!r} in '{match[1].strip()}'; known: {sorted(makers)}")
        path = RESULTS / f"{records_name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"'{match[1].strip()}' names records {path} that do not exist")
        return f"{match[1]}\n{makers[function](load_records(path))}\n{match[5]}"

    return BLOCK.sub(remake, text)


def stale_blocks(documents=DOCUMENTS, rewrite: bool = False) -> list[str]:
    """'file: records function' of every block whose text differs from what its records make now; with `rewrite`,
    those documents are written back with every block remade."""
    makers, stale = table_makers(), []
    for document in documents:
        text = document.read_text()
        fresh = refreshed(text, makers)
        old, new = BLOCK.findall(text), BLOCK.findall(fresh)
        stale += [f"{document.relative_to(ROOT)}: {a[1]} {a[2]}" for a, b in zip(old, new) if a[3] != b[3]]
        if rewrite and fresh != text:
            document.write_text(fresh)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only list the stale blocks; exit 1 if there are any")
    args = parser.parse_args()
    stale = stale_blocks(rewrite=not args.check)
    for name in stale:
        print(f"stale: {name}")
    if args.check:
        return 1 if stale else 0
    print(f"{len(stale)} block(s) rewritten" if stale else "every generated block is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
