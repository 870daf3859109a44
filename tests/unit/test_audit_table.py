"""The table format: aligned, within the width, cutting only the columns allowed to give way."""

from fsguard.audit.cli import table


def test_fits_without_cutting():
    text = table(["NAME", "COUNT"], [["a", 1], ["bbbb", 22]], 80, {0})
    assert text == "NAME  COUNT\na         1\nbbbb     22\n"


def test_cuts_the_shrinkable_columns_widest_first():
    rows = [["2024-05-01", "1001@tenant-a.example.com", "00442030001234567", "203.0.113.45"]]
    text = table(["TIME", "USER", "DEST", "IP"], rows, 50, {1, 2})
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 50
    assert "203.0.113.45" in lines[1] and "2024-05-01" in lines[1]
    assert "…" in lines[1]


def test_never_cuts_below_six_characters():
    text = table(["A", "B"], [["x" * 30, "y" * 30]], 20, {0})
    assert text.splitlines()[1].startswith("xxxxx… ")
