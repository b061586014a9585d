"""Plain-text tables and the small formatters the CLI's tables use."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_age", "format_bytes", "render_table"]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, align: str = "") -> str:
    """Rows under headers, columns padded to their widest cell, two spaces apart.

    Args:
        headers: the column titles.
        rows: the cells; each row has one cell per header (``str()`` is applied).
        align: one character per column, ``<`` (left, the default) or ``>`` (right).

    Raises:
        ValueError: a row with a different number of cells than there are headers.
    """
    cells = [[str(cell) for cell in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} columns: {row}")
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    aligns = [align[i] if i < len(align) else "<" for i in range(len(headers))]
    lines = []
    for row in [list(headers), *cells]:
        padded = [
            cell.rjust(width) if side == ">" else cell.ljust(width)
            for cell, width, side in zip(row, widths, aligns, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_bytes(count: int | float) -> str:
    """``1536`` -> ``1.5 KiB``; binary units, three significant digits."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if abs(value) < 1000 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_age(seconds: float) -> str:
    """``75.2`` -> ``1m15s ago``; a coarse, readable duration in the past."""
    if seconds < 0:
        return "-"
    whole = int(seconds)
    if whole < 1:
        return "now"
    if whole < 60:
        return f"{whole}s ago"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s ago"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m ago"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h ago"
