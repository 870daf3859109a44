"""Write README.rst's settings table (from fsguard.config.SETTINGS) and rule
table (from fsguard.policy's docstring): the code is the one source.

    .venv/bin/python scripts/build_settings_doc.py

tests/unit/test_docs.py fails when README.rst is out of date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsguard.config import INHERIT, REQUIRED, SETTINGS  # noqa: E402

START, END = ".. settings-start", ".. settings-end"
RULES_START, RULES_END = ".. rules-start", ".. rules-end"


def _default(value) -> str:
    if value is REQUIRED:
        return "(required)"
    if value is INHERIT:
        return "(global value)"
    return "``" + json.dumps(value) + "``"


def render() -> str:
    rows = [("setting", "default", "meaning")]
    for setting in SETTINGS:
        section = {"switch": "[[switch]]", "domain": '[domain."D"]', "extension": '[extension."U@D"]'}.get(
            setting.section, f"[{setting.section}]")
        rows.append((f"``{section} {setting.name}``", _default(setting.default), setting.help))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows[1:]]
    lines.append(rule)
    return "\n".join(lines)


def rule_table() -> str:
    source = (ROOT / "fsguard" / "policy.py").read_text()
    return source[source.index("====  =="):source.index("Observe mode turns")].strip()


def _between(text: str, start: str, end: str, body: str) -> str:
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n\n{body}\n\n{end}{tail}"


def updated(readme: str) -> str:
    return _between(_between(readme, START, END, render()), RULES_START, RULES_END, rule_table())


if __name__ == "__main__":
    path = ROOT / "README.rst"
    path.write_text(updated(path.read_text()))
    print(f"{path}: settings table written ({len(SETTINGS)} settings)")
