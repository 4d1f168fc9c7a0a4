"""Pieces of the model cards (README.md) that every method writes."""

from __future__ import annotations


def markdown_table(header, rows) -> list[str]:
    """A Markdown table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
