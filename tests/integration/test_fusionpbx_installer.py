"""``fsguard fusionpbx install|uninstall|status`` against a real PostgreSQL.

Each module run creates throw-away databases ``fsguard_fpbx_<random>`` on the
server of ``FSGUARD_TEST_POSTGRES`` (default
postgresql+psycopg://postgres@127.0.0.1:5432/test; it must allow CREATE
DATABASE) and drops them at the end.  If PostgreSQL cannot be reached the
tests FAIL, saying so: they are never skipped.

The FusionPBX tables are created as FusionPBX's schema class creates them
from ``app/dialplans/app_config.php`` (``resources/classes/schema.php``):
every column nullable, no defaults, only the uuid primary keys, no foreign
key constraints.  Two generations are tested: ``boolean`` (current
app_config.php: the flag columns dialplan_continue, dialplan_enabled,
dialplan_destination are boolean; with the newer *_original/hash columns,
which the installer leaves NULL) and ``text`` (older app_config.php: those
flags are text 'true'/'false').  ``v_dialplan_details`` is the same in both
(dialplan_detail_enabled boolean).

Stock entries seeded in every test (FusionPBX's own app_uuids):
  user_exists          global, order 10, continue true  (010_user_exists.xml)
  to-pstn              tenant-a.test, order 100, continue false (an outbound route)
  speed-dial-early     tenant-a.test, order 8, continue false  -> the bypass warning
  early-but-disabled   tenant-a.test, order 9, continue false, disabled -> no warning
  inbound-did          public, order 8, continue false -> no warning (public context)
"""

from __future__ import annotations

import os
import secrets
import uuid
import xml.etree.ElementTree as ET

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from fsguard import fusionpbx as fp
from fsguard.fusionpbx_cli import fusionpbx

ADMIN_URL = os.environ.get("FSGUARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PASSWORD = "Pw-never-printed-4711"  # in every URL given to the CLI; trust auth ignores it
DOMAIN_UUID = "0d1c5a57-4e38-4d2b-9a0e-7f3c1b2a9e01"
DOMAIN = "tenant-a.test"

DIALPLANS_BOOLEAN = """
CREATE TABLE v_dialplans (
domain_uuid uuid,
dialplan_uuid uuid PRIMARY KEY,
app_uuid uuid,
hostname text,
dialplan_context text,
dialplan_name text,
dialplan_number text,
dialplan_destination boolean,
dialplan_continue boolean,
dialplan_xml text,
dialplan_order numeric,
dialplan_enabled boolean,
dialplan_description text,
dialplan_hash_file text,
dialplan_hash_canonical text,
dialplan_enabled_original boolean,
dialplan_context_original text,
dialplan_order_original numeric,
insert_date timestamptz,
insert_user uuid,
update_date timestamptz,
update_user uuid)
"""
DIALPLANS_TEXT = """
CREATE TABLE v_dialplans (
domain_uuid uuid,
dialplan_uuid uuid PRIMARY KEY,
app_uuid uuid,
hostname text,
dialplan_context text,
dialplan_name text,
dialplan_number text,
dialplan_destination text,
dialplan_continue text,
dialplan_xml text,
dialplan_order numeric,
dialplan_enabled text,
dialplan_description text,
insert_date timestamptz,
insert_user uuid,
update_date timestamptz,
update_user uuid)
"""
DETAILS = """
CREATE TABLE v_dialplan_details (
domain_uuid uuid,
dialplan_uuid uuid,
dialplan_detail_uuid uuid PRIMARY KEY,
dialplan_detail_tag text,
dialplan_detail_type text,
dialplan_detail_data text,
dialplan_detail_break text,
dialplan_detail_inline text,
dialplan_detail_group numeric,
dialplan_detail_order numeric,
dialplan_detail_enabled boolean,
insert_date timestamptz,
insert_user uuid,
update_date timestamptz,
update_user uuid)
"""

# (dialplan_uuid, domain_uuid, app_uuid, context, name, order, continue, enabled, details)
SEEDS = [
    ("6b0b7a43-1a49-4a5e-9f35-5f0a1cd0c010", None, "897845b0-1f13-444c-84fe-432fd47338ca", "global",
     "user_exists", 10, "true", "true",
     [("condition", "", "", 5, "never"),
      ("action", "set", "user_exists=${user_exists id ${destination_number} ${domain_name}}", 10, None)]),
    ("6b0b7a43-1a49-4a5e-9f35-5f0a1cd0c100", DOMAIN_UUID, "8c914ec3-9fc0-8ab5-4cda-6c9288bdc9a3", DOMAIN,
     "to-pstn", 100, "false", "true",
     [("condition", "destination_number", r"^(\d{11,})$", 5, None),
      ("action", "bridge", "sofia/gateway/carrier/$1", 10, None)]),
    ("6b0b7a43-1a49-4a5e-9f35-5f0a1cd0c008", DOMAIN_UUID, "4e5a8d54-28d8-4b0e-9cde-2c1d8a6b7f01", DOMAIN,
     "speed-dial-early", 8, "false", "true",
     [("condition", "destination_number", r"^\*0(\d)$", 5, None),
      ("action", "transfer", "100$1 XML tenant-a.test", 10, None)]),
    ("6b0b7a43-1a49-4a5e-9f35-5f0a1cd0c009", DOMAIN_UUID, "4e5a8d54-28d8-4b0e-9cde-2c1d8a6b7f02", DOMAIN,
     "early-but-disabled", 9, "false", "false",
     [("condition", "destination_number", "^999999$", 5, None), ("action", "hangup", "", 10, None)]),
    ("6b0b7a43-1a49-4a5e-9f35-5f0a1cd0c801", DOMAIN_UUID, "c03b422e-13a8-bd1b-e42b-b6b9b4d27ce4", "public",
     "inbound-did", 8, "false", "true",
     [("condition", "destination_number", "^4930123456$", 5, None),
      ("action", "transfer", "1001 XML tenant-a.test", 10, None)]),
]


# --- fixtures


class Server:
    """The test PostgreSQL: makes and drops fsguard_fpbx_* databases."""

    def __init__(self) -> None:
        self.admin = make_url(ADMIN_URL)
        self.engine = sa.create_engine(self.admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool,
                                       connect_args={"connect_timeout": 5})
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as exc:
            pytest.fail(f"PostgreSQL at {self.admin.render_as_string(hide_password=True)} is unreachable "
                        f"({exc.orig}).  The FusionPBX installer tests need a real PostgreSQL: start it "
                        "(./dev.sh test does: pg_ctlcluster 15 main start) or point FSGUARD_TEST_POSTGRES at one.",
                        pytrace=False)
        self.created: list[str] = []

    def create(self, *ddl: str) -> sa.URL:
        name = f"fsguard_fpbx_{secrets.token_hex(6)}"
        with self.engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        url = self.admin.set(database=name)
        if ddl:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.begin() as connection:
                for statement in ddl:
                    connection.execute(sa.text(statement))
            engine.dispose()
        return url

    def drop_all(self) -> None:
        with self.engine.connect() as connection:
            for name in self.created:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="module")
def server():
    made = Server()
    yield made
    made.drop_all()


class FusionPBX:
    """One FusionPBX-shaped database, reset to the seeded stock entries."""

    def __init__(self, url: sa.URL, flavour: str) -> None:
        self.url = url
        self.flavour = flavour
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        # what the CLI is given: with a password, to prove it is never printed
        self.cli_url = url.set(password=PASSWORD).render_as_string(hide_password=False)

    def flag(self, value: bool) -> str:
        return "true" if value else "false"

    def reset(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM v_dialplan_details"))
            connection.execute(sa.text("DELETE FROM v_dialplans"))
            for dialplan_uuid, domain_uuid, app_uuid, context, name, order, cont, enabled, details in SEEDS:
                self.add(connection, dialplan_uuid, domain_uuid, app_uuid, context, name, order, cont, enabled,
                         details)

    def add(self, connection, dialplan_uuid, domain_uuid, app_uuid, context, name, order, cont, enabled,
            details=()) -> None:
        # flags as SQL literals: 'true'/'false' fit text and boolean columns alike, as in FusionPBX's own SQL
        connection.execute(sa.text(
            "INSERT INTO v_dialplans (dialplan_uuid, domain_uuid, app_uuid, dialplan_context, dialplan_name, "
            "dialplan_order, dialplan_continue, dialplan_enabled, dialplan_xml, dialplan_description, insert_date) "
            f"VALUES (:u, :d, :a, :c, :n, :o, '{cont}', '{enabled}', :x, 'seeded', now())"
        ), {"u": dialplan_uuid, "d": domain_uuid, "a": app_uuid, "c": context, "n": name, "o": order,
            "x": f'<extension name="{name}" continue="{cont}" uuid="{dialplan_uuid}">\n</extension>\n'})
        for tag, type_, data, order_, brk in details:
            connection.execute(sa.text(
                "INSERT INTO v_dialplan_details (dialplan_detail_uuid, domain_uuid, dialplan_uuid, "
                "dialplan_detail_tag, dialplan_detail_type, dialplan_detail_data, dialplan_detail_break, "
                "dialplan_detail_group, dialplan_detail_order, dialplan_detail_enabled) "
                "VALUES (:du, :d, :u, :t, :ty, :da, :b, 0, :o, true)"
            ), {"du": str(uuid.uuid4()), "d": domain_uuid, "u": dialplan_uuid, "t": tag, "ty": type_, "da": data,
                "b": brk, "o": order_})

    def execute(self, sql: str, **params) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.text(sql), params)

    def rows(self, where: str = "true", **params) -> list:
        with self.engine.connect() as connection:
            return connection.execute(sa.text(
                f"SELECT * FROM v_dialplans WHERE {where} ORDER BY dialplan_order, dialplan_name"), params).all()

    def ours(self) -> dict[str, object]:
        return {str(r.dialplan_uuid): r for r in self.rows("dialplan_uuid IN (:c, :g)",
                                                           c=fp.CHECK_DIALPLAN_UUID, g=fp.GUARD_DIALPLAN_UUID)}

    def details(self, dialplan_uuid: str) -> list:
        with self.engine.connect() as connection:
            return connection.execute(sa.text(
                "SELECT * FROM v_dialplan_details WHERE dialplan_uuid = :u "
                "ORDER BY dialplan_detail_group, dialplan_detail_order"), {"u": dialplan_uuid}).all()

    def count(self, table: str) -> int:
        with self.engine.connect() as connection:
            return connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()

    def others(self) -> tuple[list, list]:
        """Every row that is not ours, all columns as text: must never change."""
        with self.engine.connect() as connection:
            dialplans = connection.execute(sa.text(
                "SELECT d::text FROM v_dialplans d WHERE dialplan_uuid NOT IN (:c, :g) ORDER BY dialplan_uuid"),
                {"c": fp.CHECK_DIALPLAN_UUID, "g": fp.GUARD_DIALPLAN_UUID}).scalars().all()
            details = connection.execute(sa.text(
                "SELECT s::text FROM v_dialplan_details s WHERE dialplan_uuid NOT IN (:c, :g) "
                "ORDER BY dialplan_detail_uuid"), {"c": fp.CHECK_DIALPLAN_UUID, "g": fp.GUARD_DIALPLAN_UUID}
            ).scalars().all()
        return dialplans, details

    def served(self, context: str, hostname: str = "fs1") -> list[str]:
        """The dialplan_xml rows FusionPBX's Lua handler (dialplan.lua) serves for a context, in order."""
        if context == "public" or "@" in context:
            where = "p.dialplan_context = :call_context "
        else:
            where = "p.dialplan_context in (:call_context, '${domain_name}', 'global') "
        with self.engine.connect() as connection:
            return connection.execute(sa.text(
                "select dialplan_xml from v_dialplans as p where " + where +
                "and (p.hostname = :hostname or p.hostname is null) and p.dialplan_enabled = 'true' "
                "order by p.dialplan_order asc"), {"call_context": context, "hostname": hostname}).scalars().all()


@pytest.fixture(scope="module", params=["boolean", "text"])
def database(request, server):
    ddl = DIALPLANS_BOOLEAN if request.param == "boolean" else DIALPLANS_TEXT
    db = FusionPBX(server.create(ddl, DETAILS), request.param)
    yield db
    db.engine.dispose()


@pytest.fixture
def fpbx(database):
    database.reset()
    return database


def cli(*args: str, env: dict | None = None):
    """Run ``fsguard fusionpbx ARGS``; the password must never appear in what it prints."""
    result = CliRunner().invoke(fusionpbx, list(args), env={fp.PASSWORD_ENV: None, **(env or {})},
                                catch_exceptions=False)
    assert PASSWORD not in result.output
    return result


# --- expectations


def detail_rows(rows) -> list[tuple]:
    return [(r.dialplan_detail_tag, r.dialplan_detail_type, r.dialplan_detail_data, int(r.dialplan_detail_order),
             int(r.dialplan_detail_group), r.dialplan_detail_break, r.dialplan_detail_inline,
             r.dialplan_detail_enabled, r.domain_uuid) for r in rows]


def expected_details(entry: fp.Entry) -> list[tuple]:
    return [(d.tag, d.type, d.data, d.order, 0, None, None, True, None) for d in entry.details]


def assert_installed(db: FusionPBX, address: str = "127.0.0.1:8084", mode: str = "sync") -> None:
    ours = db.ours()
    assert set(ours) == {fp.CHECK_DIALPLAN_UUID, fp.GUARD_DIALPLAN_UUID}
    for entry in fp.entries(address, mode):
        row = ours[entry.dialplan_uuid]
        assert row.domain_uuid is None and row.hostname is None and row.dialplan_number is None
        assert row.dialplan_context == "global"
        assert (row.dialplan_name, int(row.dialplan_order)) == (entry.name, entry.order)
        assert fp.flag(row.dialplan_continue) is entry.continue_
        assert fp.flag(row.dialplan_enabled) is True
        assert row.dialplan_destination is None
        assert str(row.app_uuid) == entry.app_uuid
        assert row.dialplan_description == entry.description
        assert row.dialplan_xml == entry.xml
        assert row.insert_date is not None and row.insert_user is None
        assert detail_rows(db.details(entry.dialplan_uuid)) == expected_details(entry)
        assert {str(r.dialplan_detail_uuid) for r in db.details(entry.dialplan_uuid)} == {
            fp.detail_uuid(entry, d) for d in entry.details}
    socket = [r.dialplan_detail_data for r in db.details(fp.GUARD_DIALPLAN_UUID) if r.dialplan_detail_type == "socket"]
    assert socket == [fp.socket_data(address, mode)]
    if db.flavour == "text":
        assert {ours[u].dialplan_continue for u in ours} == {"true", "false"}
        assert {ours[u].dialplan_enabled for u in ours} == {"true"}


# --- install


def test_install_writes_both_global_entries_and_their_details(fpbx):
    before = fpbx.others()
    result = cli("install", "--db-url", fpbx.cli_url)
    assert result.exit_code == 0, result.output
    assert_installed(fpbx)
    assert fpbx.count("v_dialplans") == len(SEEDS) + 2
    assert fpbx.others() == before
    out = result.output
    assert "fsguard-verdict-check (order 5, continue false): inserted" in out
    assert "fsguard (order 12, continue true): inserted, socket 127.0.0.1:8084 full" in out
    assert "rm -f /var/cache/fusionpbx/dialplan.*" in out and "fs_cli -x 'memcache flush'" in out
    assert f"postgresql+psycopg://{make_url(ADMIN_URL).username}:***@" in out  # never the password


def test_installed_entries_are_what_fusionpbx_serves_in_a_domain_context_and_not_in_public(fpbx):
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    served = fpbx.served(DOMAIN)
    names = [ET.fromstring(x).get("name") for x in served]
    assert names == ["fsguard-verdict-check", "speed-dial-early", "user_exists", "fsguard", "to-pstn"]
    document = ET.fromstring(f'<context name="{DOMAIN}">' + "\n".join(served) + "</context>")  # well-formed
    guard = document.findall("extension")[3]
    assert guard.get("continue") == "true"
    assert [a.get("data") for a in guard.iter("action") if a.get("application") == "socket"] == [
        "127.0.0.1:8084 full"]
    assert [ET.fromstring(x).get("name") for x in fpbx.served("public")] == ["inbound-did"]


def test_install_twice_keeps_one_row_each_and_a_new_address_updates_them_in_place(fpbx):
    before = fpbx.others()
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    first = fpbx.ours()

    again = cli("install", "--db-url", fpbx.cli_url)
    assert again.exit_code == 0, again.output
    assert "already installed, enabled and identical" in again.output and "Nothing to write." in again.output
    assert fpbx.ours() == first  # not even update_date moved
    assert fpbx.count("v_dialplans") == len(SEEDS) + 2

    moved = cli("install", "--db-url", fpbx.cli_url, "--address", "192.0.2.7:9084", "--mode", "async")
    assert moved.exit_code == 0, moved.output
    assert "fsguard (order 12, continue true): updated in place, socket 192.0.2.7:9084 async full" in moved.output
    assert "detail + 40 action socket '192.0.2.7:9084 async full'" in moved.output
    assert "fsguard-verdict-check (order 5, continue false): already installed" in moved.output
    assert_installed(fpbx, "192.0.2.7:9084", "async")
    assert fpbx.count("v_dialplans") == len(SEEDS) + 2
    assert fpbx.count("v_dialplan_details") == sum(len(s[-1]) for s in SEEDS) + 5 + 10
    guard = fpbx.ours()[fp.GUARD_DIALPLAN_UUID]
    assert guard.insert_date == first[fp.GUARD_DIALPLAN_UUID].insert_date and guard.update_date is not None
    assert fpbx.ours()[fp.CHECK_DIALPLAN_UUID] == first[fp.CHECK_DIALPLAN_UUID]
    assert fpbx.others() == before


def test_install_puts_back_an_entry_changed_or_disabled_in_dialplan_manager(fpbx):
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    fpbx.execute("UPDATE v_dialplans SET dialplan_enabled = 'false', dialplan_order = 20 WHERE dialplan_uuid = :u",
                 u=fp.GUARD_DIALPLAN_UUID)
    fpbx.execute("DELETE FROM v_dialplan_details WHERE dialplan_uuid = :u AND dialplan_detail_order = 45",
                 u=fp.GUARD_DIALPLAN_UUID)
    status = cli("status", "--db-url", fpbx.cli_url)
    assert status.exit_code == 1
    assert "fsguard                installed, DISABLED, order 20" in status.output
    assert "dialplan_order: 20 -> 12" in status.output
    assert "detail + 45 action unset 'park_timeout'" in status.output

    repaired = cli("install", "--db-url", fpbx.cli_url)
    assert repaired.exit_code == 0, repaired.output
    assert "updated in place and enabled again" in repaired.output
    assert_installed(fpbx)
    assert cli("status", "--db-url", fpbx.cli_url).exit_code == 0


def test_install_refuses_fsguard_entries_it_did_not_write_and_touches_nothing(fpbx):
    by_hand = str(uuid.uuid4())
    with fpbx.engine.begin() as connection:  # Dialplan Manager: random dialplan_uuid and app_uuid
        fpbx.add(connection, by_hand, None, str(uuid.uuid4()), "global", "fsguard", 12, "true", "true",
                 [("condition", "${sip_auth_username}", "^.+$", 5, None)])
    before = fpbx.others()
    result = cli("install", "--db-url", fpbx.cli_url)
    assert result.exit_code == 65
    assert "did not write" in result.output and by_hand in result.output
    assert fpbx.ours() == {} and fpbx.others() == before

    status = cli("status", "--db-url", fpbx.cli_url)
    assert status.exit_code == 1 and by_hand in status.output and "foreign fsguard entries" in status.output
    gone = cli("uninstall", "--db-url", fpbx.cli_url)
    assert gone.exit_code == 0 and "Left untouched" in gone.output and by_hand in gone.output
    assert fpbx.others() == before


def test_install_refuses_an_app_defaults_import_of_the_templates(fpbx):
    imported = str(uuid.uuid4())
    with fpbx.engine.begin() as connection:  # App Defaults: random dialplan_uuid, the template's app_uuid
        fpbx.add(connection, imported, None, fp.CHECK_APP_UUID, "global", "fsguard-verdict-check", 5, "false", "true")
    result = cli("install", "--db-url", fpbx.cli_url)
    assert result.exit_code == 65 and imported in result.output
    assert fpbx.ours() == {}


# --- dry run


def test_dry_run_writes_nothing_and_prints_the_sql_a_real_install_runs(fpbx):
    before = fpbx.others()
    dry = cli("install", "--db-url", fpbx.cli_url, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert fpbx.ours() == {} and fpbx.others() == before
    assert dry.output.startswith("-- fsguard fusionpbx install --dry-run: nothing is written")
    assert "would be inserted" in dry.output and "'127.0.0.1:8084 full'" in dry.output
    assert dry.output.count("INSERT INTO v_dialplans ") == 2 and dry.output.count("INSERT INTO v_dialplan_details") == 2

    # the printed SQL, run by hand, writes what install writes
    with psycopg.connect(fpbx.url.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as connection:
        connection.execute(dry.output)
    by_hand = {u: r._mapping for u, r in fpbx.ours().items()}
    by_hand_details = {u: detail_rows(fpbx.details(u)) for u in by_hand}
    assert_installed(fpbx)
    fpbx.reset()
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    installed = {u: r._mapping for u, r in fpbx.ours().items()}
    for u in installed:
        strip = lambda m: {k: v for k, v in m.items() if k not in ("insert_date", "update_date")}  # noqa: E731
        assert strip(by_hand[u]) == strip(installed[u])
        assert by_hand_details[u] == detail_rows(fpbx.details(u))


def test_dry_runs_of_a_current_install_and_of_uninstall_write_nothing(fpbx):
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    installed, before = fpbx.ours(), fpbx.others()

    same = cli("install", "--db-url", fpbx.cli_url, "--dry-run")
    assert same.exit_code == 0 and "-- nothing to write" in same.output and "INSERT" not in same.output

    moved = cli("install", "--db-url", fpbx.cli_url, "--dry-run", "--address", "192.0.2.9:8084")
    assert moved.exit_code == 0 and "would be updated in place" in moved.output
    assert "UPDATE v_dialplans SET" in moved.output and f"'{fp.GUARD_DIALPLAN_UUID}'" in moved.output

    gone = cli("uninstall", "--db-url", fpbx.cli_url, "--dry-run")
    assert gone.exit_code == 0, gone.output
    assert gone.output.count("DELETE FROM v_dialplans WHERE") == 2
    assert gone.output.count("DELETE FROM v_dialplan_details WHERE") == 2
    assert fpbx.ours() == installed and fpbx.others() == before


# --- status


def test_status_before_and_after_install_with_the_bypass_warning(fpbx):
    missing = cli("status", "--db-url", fpbx.cli_url)
    assert missing.exit_code == 1
    assert "fsguard-verdict-check  not installed" in missing.output
    assert "fsguard                not installed" in missing.output

    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    result = cli("status", "--db-url", fpbx.cli_url)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "fsguard-verdict-check  installed, enabled, order 5, continue false, matches this version" in out
    assert ("fsguard                installed, enabled, order 12, continue true, socket 127.0.0.1:8084 (sync), "
            "matches this version") in out
    assert "Status: OK" in out
    warning = out[out.index("WARNING: 1 enabled entry ordered before fsguard"):]
    assert "'speed-dial-early' (order 8, context tenant-a.test" in warning
    for quiet in ("early-but-disabled", "inbound-did", "user_exists", "to-pstn"):
        assert quiet not in out


def test_status_reports_the_installed_address_and_mode(fpbx):
    assert cli("install", "--db-url", fpbx.cli_url, "--address", "[::1]:8090", "--mode", "async").exit_code == 0
    assert [r.dialplan_detail_data for r in fpbx.details(fp.GUARD_DIALPLAN_UUID)
            if r.dialplan_detail_type == "socket"] == ["::1:8090 async full"]
    result = cli("status", "--db-url", fpbx.cli_url)
    assert result.exit_code == 0 and "socket [::1]:8090 (async), matches this version" in result.output


def test_status_flags_a_guard_without_its_check_as_fail_open(fpbx):
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    fpbx.execute("UPDATE v_dialplans SET dialplan_enabled = 'false' WHERE dialplan_uuid = :u",
                 u=fp.CHECK_DIALPLAN_UUID)
    result = cli("status", "--db-url", fpbx.cli_url)
    assert result.exit_code == 1 and "FAIL-OPEN" in result.output


# --- uninstall


def test_uninstall_removes_exactly_our_entries_and_again_is_a_no_op(fpbx):
    seeded = fpbx.others()
    assert cli("install", "--db-url", fpbx.cli_url).exit_code == 0
    result = cli("uninstall", "--db-url", fpbx.cli_url)
    assert result.exit_code == 0, result.output
    assert "fsguard (order 12, continue true): deleted (with its details)" in result.output
    assert "fsguard-verdict-check (order 5, continue false): deleted (with its details)" in result.output
    assert fpbx.ours() == {}
    assert fpbx.details(fp.CHECK_DIALPLAN_UUID) == [] and fpbx.details(fp.GUARD_DIALPLAN_UUID) == []
    assert fpbx.others() == seeded

    again = cli("uninstall", "--db-url", fpbx.cli_url)
    assert again.exit_code == 0, again.output
    assert "Nothing to delete." in again.output and "not installed, nothing to delete" in again.output
    assert fpbx.others() == seeded


# --- the database itself


def test_password_from_the_environment_is_used_and_not_printed(fpbx):
    url = fpbx.url.set(password=None).render_as_string(hide_password=False)
    result = cli("install", "--db-url", url, env={fp.PASSWORD_ENV: PASSWORD})
    assert result.exit_code == 0, result.output
    assert_installed(fpbx)


def test_a_database_without_the_fusionpbx_tables_is_refused(server):
    empty = server.create()
    url = empty.set(password=PASSWORD).render_as_string(hide_password=False)
    for command in (["install"], ["install", "--dry-run"], ["uninstall"], ["status"]):
        result = cli(*command, "--db-url", url)
        assert result.exit_code == 65, result.output
        assert "this database does not look like FusionPBX: table v_dialplans missing" in result.output
    half = server.create(DIALPLANS_BOOLEAN)
    result = cli("status", "--db-url", half.set(password=PASSWORD).render_as_string(hide_password=False))
    assert result.exit_code == 65 and "table v_dialplan_details missing" in result.output


def test_an_unreachable_database_is_a_clear_error():
    url = f"postgresql+psycopg://fusionpbx:{PASSWORD}@127.0.0.1:1/fusionpbx"
    for command in (["install"], ["uninstall"], ["status"]):
        result = cli(*command, "--db-url", url)
        assert result.exit_code == 69
        assert "cannot connect to the FusionPBX database at postgresql+psycopg://fusionpbx:***@127.0.0.1:1/fusionpbx" \
            in result.output
