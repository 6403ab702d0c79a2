"""The training step's table in ``benchmarks/README.md``: memory and predicted time per route at the plan
points, written from the launch plan and the cost model (``static_report.step_plan_rows``; predictions,
not measurements). ``python -m benchmarks.step_table`` rewrites the table between its markers;
``tests/test_step_report.py`` checks that the committed README holds what it would write."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.static_report import step_markdown, step_plan_rows

README = Path(__file__).parent / "README.md"
START, END = "<!-- step-table:start -->", "<!-- step-table:end -->"


def with_table(text: str) -> str:
    """``text`` with the step table between :data:`START` and :data:`END` regenerated."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{step_markdown(step_plan_rows()).strip()}\n{END}{tail}"


def main() -> int:
    README.write_text(with_table(README.read_text()))
    print(f"step table -> {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
