"""The FusionPBX installer's entries are the shipped templates, stored as FusionPBX's importer stores them.

``freeswitch-conf/fusionpbx/*.xml`` are the reference.  ``import_template``
below re-implements FusionPBX's template importer (``dialplan::import()`` in
``app/dialplans/resources/classes/dialplan.php`` of fusionpbx/fusionpbx):
detail order starts at 5; a condition takes the current order; a condition
with actions adds 5 before its actions, each action/anti-action takes the
order and adds 5; a condition with actions closes the group; every condition
adds 5 at its end; empty ``break``/``inline`` are not stored (NULL).
"""

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fsguard import fusionpbx as fp

TEMPLATES = Path(__file__).resolve().parents[2] / "freeswitch-conf" / "fusionpbx"


def import_template(path: Path) -> dict:
    """What FusionPBX's import() makes of a template: the v_dialplans fields and the details."""
    extension = ET.parse(path).getroot()
    assert extension.tag == "extension"
    attrs = extension.attrib
    details, order, group = [], 5, 0
    for condition in extension.findall("condition"):
        details.append(fp.Detail("condition", condition.get("field"), condition.get("expression"), order, group,
                                 condition.get("break") or None))
        actions = [c for c in condition if c.tag in ("action", "anti-action")]
        if actions:
            order += 5
            for tag in ("action", "anti-action"):  # import() adds all actions, then all anti-actions
                for action in (a for a in actions if a.tag == tag):
                    details.append(fp.Detail(tag, action.get("application"), action.get("data"), order, group,
                                             None, action.get("inline") or None))
                    order += 5
            group += 1
        order += 5
    return {
        "name": attrs["name"],
        "number": attrs.get("number") or None,
        "context": "global" if attrs.get("global") == "true" else attrs.get("context"),
        "continue": attrs.get("continue") == "true",
        "app_uuid": attrs["app_uuid"],
        "order": int(attrs["order"]),
        "enabled": attrs.get("enabled", "true") == "true",
        "description": attrs["description"],
        "details": details,
    }


@pytest.mark.parametrize("key, template", [("check", "005_fsguard_verdict_check.xml"), ("guard", "012_fsguard.xml")])
def test_entries_are_the_templates_as_fusionpbx_imports_them(key, template):
    imported = import_template(TEMPLATES / template)
    entry = {e.key: e for e in fp.entries()}[key]
    assert imported["context"] == "global" and imported["number"] is None and imported["enabled"]
    assert (entry.name, entry.order, entry.continue_, entry.app_uuid, entry.description) == (
        imported["name"], imported["order"], imported["continue"], imported["app_uuid"], imported["description"])
    assert list(entry.details) == imported["details"]


def test_fixed_uuids_are_distinct_and_match_the_templates():
    uuids = {fp.CHECK_DIALPLAN_UUID, fp.GUARD_DIALPLAN_UUID, fp.CHECK_APP_UUID, fp.GUARD_APP_UUID}
    assert len(uuids) == 4
    check, guard = fp.entries()
    assert (check.dialplan_uuid, guard.dialplan_uuid) == fp.OUR_DIALPLAN_UUIDS
    detail_uuids = {fp.detail_uuid(e, d) for e in (check, guard) for d in e.details}
    assert len(detail_uuids) == len(check.details) + len(guard.details)
    assert fp.detail_uuid(check, check.details[0]) == fp.detail_uuid(fp.entries()[0], fp.entries()[0].details[0])


def test_dialplan_xml_is_what_fusionpbx_renders_and_what_the_template_says():
    check, guard = fp.entries()
    assert check.xml == (
        f'<extension name="fsguard-verdict-check" continue="false" uuid="{fp.CHECK_DIALPLAN_UUID}">\n'
        '\t<condition field="destination_number" expression="^fsguard-verdict-check$"/>\n'
        '\t<condition field="${fsguard_verdict}" expression="^allow$">\n'
        f'\t\t<action application="log" data="{check.details[2].data}"/>\n'
        f'\t\t<anti-action application="log" data="{check.details[3].data}"/>\n'
        '\t\t<anti-action application="hangup" data="CALL_REJECTED"/>\n'
        '\t</condition>\n'
        '</extension>\n'
    )
    for entry, template in ((check, "005_fsguard_verdict_check.xml"), (guard, "012_fsguard.xml")):
        rendered, source = ET.fromstring(entry.xml), ET.parse(TEMPLATES / template).getroot()
        assert rendered.get("name") == source.get("name") and rendered.get("continue") == source.get("continue")
        assert rendered.get("uuid") == entry.dialplan_uuid

        def shape(extension):
            return [(c.get("field"), c.get("expression"), [(a.tag, a.get("application"), a.get("data")) for a in c])
                    for c in extension.findall("condition")]

        assert shape(rendered) == shape(source)


@pytest.mark.parametrize("address, mode, data", [
    ("127.0.0.1:8084", "sync", "127.0.0.1:8084 full"),
    ("10.1.2.3:9000", "async", "10.1.2.3:9000 async full"),
    ("fsguard.local:8084", "sync", "fsguard.local:8084 full"),
    ("[::1]:8084", "sync", "::1:8084 full"),  # socket splits the port off at the last colon
])
def test_socket_data_round_trips(address, mode, data):
    assert fp.socket_data(address, mode) == data
    assert fp.parse_socket_data(data) == (address, mode)
    guard = fp.entries(address, mode)[1]
    assert [d.data for d in guard.details if d.type == "socket"] == [data]
    assert f'data="{data}"' in guard.xml


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:", ":8084", "127.0.0.1:0", "127.0.0.1:70000",
                                 "a b:8084", 'x"y:8084', "127.0.0.1:80a"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(ValueError):
        fp.socket_data(bad, "sync")


def test_only_the_guard_differs_between_modes_and_addresses():
    default, other = fp.entries(), fp.entries("192.0.2.1:9999", "async")
    assert default[0] == other[0]
    changed = [(a.data, b.data) for a, b in zip(default[1].details, other[1].details, strict=True) if a != b]
    assert changed == [("127.0.0.1:8084 full", "192.0.2.1:9999 async full")]


def test_url_password_comes_from_the_environment_only_when_the_url_has_none():
    env = {fp.PASSWORD_ENV: "from-env"}
    assert fp.resolve_url("postgresql+psycopg://fusionpbx@127.0.0.1/fusionpbx", env).password == "from-env"
    assert fp.resolve_url("postgresql+psycopg://fusionpbx:in-url@127.0.0.1/fusionpbx", env).password == "in-url"
    assert fp.resolve_url("postgresql+psycopg://fusionpbx@127.0.0.1/fusionpbx", {}).password is None
    url = fp.resolve_url("postgresql://fusionpbx:in-url@127.0.0.1/fusionpbx", {})
    assert url.drivername == "postgresql+psycopg"
    assert fp.safe_url(url) == "postgresql+psycopg://fusionpbx:***@127.0.0.1/fusionpbx"


@pytest.mark.parametrize("url", ["mysql://u:Secret-1@h/db", "sqlite:///x.db", "::Secret-1::",
                                 "postgresql+asyncpg://u:Secret-1@h/d"])
def test_unusable_urls_are_refused_without_showing_the_password(url):
    with pytest.raises(fp.FusionPBXError) as error:
        fp.resolve_url(url, {})
    assert "Secret-1" not in str(error.value)


def test_differences_ignore_what_fusionpbx_stores_as_null_and_name_what_changed():
    check, guard = fp.entries()
    wanted = fp.expected(guard)
    assert fp.differences(wanted, wanted) == []
    same = fp.Row(**{**wanted.__dict__, "number": None, "hostname": None})
    assert fp.differences(same, wanted) == []
    moved = fp.Row(**{**wanted.__dict__, "order": fp.Decimal(20), "continue_": False})
    assert fp.differences(moved, wanted) == ["dialplan_continue: false -> true", "dialplan_order: 20 -> 12"]
    other = fp.expected(fp.entries("192.0.2.1:9999")[1])
    lines = fp.differences(other, wanted)
    assert "detail - 40 action socket '192.0.2.1:9999 full'" in lines
    assert "detail + 40 action socket '127.0.0.1:8084 full'" in lines
    assert "dialplan_xml: differs" in lines


def test_flags_are_true_only_as_fusionpbx_tests_them():
    assert fp.flag(True) and fp.flag("true")  # FusionPBX: dialplan_enabled = 'true'
    assert not any(fp.flag(v) for v in (False, "false", None, "", "1", "t", "yes", "TRUE"))


def test_importing_the_cli_group_does_not_import_sqlalchemy():
    probe = "import sys, fsguard.fusionpbx_cli; assert 'sqlalchemy' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
