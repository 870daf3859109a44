"""The shipped dialplan files agree with the daemon: emergency numbers, variables, socket mode."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fsguard.policy import DEFAULT_EMERGENCY_NUMBERS

ROOT = Path(__file__).resolve().parents[2]
GUARDS = [ROOT / "freeswitch-conf" / "dialplan" / "00_fsguard.xml", ROOT / "freeswitch-conf" / "fusionpbx" / "012_fsguard.xml"]


def destination_pattern(path: Path) -> re.Pattern:
    root = ET.parse(path).getroot()
    [condition] = [c for c in root.iter("condition") if c.get("field") == "destination_number"
                   and "(?!" in c.get("expression", "")]
    return re.compile(condition.get("expression"))


@pytest.mark.parametrize("path", GUARDS, ids=lambda p: p.name)
def test_emergency_numbers_never_reach_the_socket(path):
    pattern = destination_pattern(path)
    for number in DEFAULT_EMERGENCY_NUMBERS:
        assert not pattern.search(number), f"{number} would be sent to fsguard by {path.name}"
    for ordinary in ("1002", "00442030001234", "9111", "0911"):
        assert pattern.search(ordinary)
    assert not pattern.search("fsguard-verdict-check")  # the re-hunt never re-enters the guard


@pytest.mark.parametrize("path", GUARDS, ids=lambda p: p.name)
def test_guard_uses_sync_socket_and_checks_the_verdict_variable(path):
    text = path.read_text()
    assert re.search(r'application="socket" data="127\.0\.0\.1:8084 full"', text)
    assert 'data="fsguard-verdict-check XML ${context}"' in text
    assert "resume" not in re.sub(r"<!--.*?-->", "", text, flags=re.S)


def test_check_extension_refuses_unless_allow():
    root = ET.parse(ROOT / "freeswitch-conf" / "dialplan" / "00_fsguard.xml").getroot()
    check = next(e for e in root.iter("extension") if e.get("name") == "fsguard-verdict-check")
    verdict = next(c for c in check.iter("condition") if c.get("field") == "${fsguard_verdict}")
    assert verdict.get("expression") == "^allow$"
    assert [a.get("data") for a in verdict.iter("anti-action") if a.get("application") == "hangup"] == ["CALL_REJECTED"]
    assert list(root.iter("extension"))[0] is check  # first, so the re-hunt stops there
