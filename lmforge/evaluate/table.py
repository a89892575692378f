"""`format_table`: rows aligned in plain text or as a GitHub markdown table (every report prints one)."""

from __future__ import annotations


def format_table(columns: list[str], rows: list[list], markdown: bool = False) -> str:
    """Columns aligned in plain text, or a GitHub markdown table."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
