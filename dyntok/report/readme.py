"""Keep the README's results table in step with a benchmark's ``results.json``.

The README marks where the table goes::

    <!-- results:start -->
    (generated: do not edit by hand)
    <!-- results:end -->

and :func:`update_readme` rewrites only what lies between the markers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .leaderboard import COLUMN_NOTES, describe_setup, leaderboard_rows, render_table

__all__ = ["START_MARKER", "END_MARKER", "readme_section", "replace_between_markers", "update_readme"]

START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"


def readme_section(results: dict[str, Any], report_link: str | None = None) -> str:
    """The generated block: how the numbers were made, the leaderboard, and what the columns mean."""
    spec = results.get("spec", {})
    lines = [f"Benchmark `{spec.get('name', '?')}`: {describe_setup(results)}", "",
             render_table(leaderboard_rows(results)), "", COLUMN_NOTES]
    if report_link:
        lines += ["", f"Full report and plots: [{report_link}]({report_link})."]
    return "\n".join(lines)


def replace_between_markers(text: str, content: str) -> str:
    """``text`` with everything between the results markers replaced by ``content``."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0:
        missing = START_MARKER if start < 0 else END_MARKER
        raise ValueError(f"the README has no {missing} marker; add {START_MARKER} and {END_MARKER} on lines of "
                         f"their own where the results table should go")
    if end < start:
        raise ValueError(f"{END_MARKER} comes before {START_MARKER} in the README")
    return f"{text[:start + len(START_MARKER)]}\n{content.strip()}\n{text[end:]}"


def update_readme(readme: str | Path, results: dict[str, Any], report_link: str | None = None) -> Path:
    """Rewrite the results block of ``readme`` from ``results``."""
    readme = Path(readme)
    if not readme.is_file():
        raise FileNotFoundError(f"no README at {readme}")
    readme.write_text(replace_between_markers(readme.read_text(), readme_section(results, report_link)))
    return readme
