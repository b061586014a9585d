"""The CLI's plain-text formatting."""

from __future__ import annotations

import pytest

from gpupool.cli._table import format_age, format_bytes, render_table


def test_columns_are_padded_to_the_widest_cell() -> None:
    text = render_table(["NAME", "N"], [["a", 1], ["longer", 100]], align="<>")
    assert text.splitlines() == ["NAME      N", "a         1", "longer  100"]


def test_a_row_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="2 columns"):
        render_table(["A", "B"], [["only one"]])


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (64 << 20, "64 MiB"),
        (3 << 40, "3 TiB"),
        (5000 << 40, "5000 TiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "now"), (5, "5s ago"), (75, "1m15s ago"), (7380, "2h03m ago"), (90000, "1d01h ago")],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text
