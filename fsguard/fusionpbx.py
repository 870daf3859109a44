"""fsguard's two global dialplan entries, written straight into FusionPBX's database.

The entries are the ones of ``freeswitch-conf/fusionpbx/`` (005 the verdict
check, 012 the guard; ``tests/unit/test_fusionpbx_entries.py`` checks this
module against those templates).  They are stored the way FusionPBX's own
template importer stores a global template, ``dialplan::import()`` in
``app/dialplans/resources/classes/dialplan.php`` of fusionpbx/fusionpbx:

* ``v_dialplans``: ``domain_uuid`` NULL and ``dialplan_context`` ``global``
  (``global="true"``), ``app_uuid`` from the template, ``dialplan_number`` /
  ``dialplan_destination`` / ``hostname`` NULL (empty values are stored as
  NULL by FusionPBX's ``database::save()``), ``dialplan_enabled`` true,
  ``insert_date`` now(), ``insert_user`` NULL (no FusionPBX user; the
  upgrade script has none either).
* ``v_dialplan_details``: one row per condition / action / anti-action,
  ``dialplan_detail_order`` 5, 10, 15, ... in template order, ``group`` 0
  (all conditions of one extension share group 0 until a condition with
  actions closes it), ``break`` and ``inline`` NULL when absent,
  ``dialplan_detail_enabled`` true, ``domain_uuid`` NULL.
* ``dialplan_xml``: what ``dialplan::xml()`` renders from those details
  (same layout, tabs and attribute order).  FusionPBX's Lua XML handler
  (``app/scripts/.../xml_handler/resources/scripts/dialplan/dialplan.lua``)
  serves a domain context from ``dialplan_xml`` alone: every enabled row
  whose context is the domain, ``${domain_name}`` or ``global`` and whose
  ``hostname`` is the switch's or NULL, ``ORDER BY dialplan_order``.  The
  details are what Dialplan Manager shows and edits (and from which it
  regenerates ``dialplan_xml`` on save).

Our rows are ours by their fixed ``dialplan_uuid`` (below; chosen once, never
change them: uninstall and updates find the rows by them).  Nothing else is
ever updated or deleted.

The flag columns ``dialplan_continue``, ``dialplan_enabled`` and
``dialplan_destination`` are ``text`` ('true'/'false') in FusionPBX up to
5.3-ish and ``boolean`` in newer releases (``app/dialplans/app_config.php``);
the type is read from the database and both are handled.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from xml.sax.saxutils import escape

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.types import TypeDecorator

# --- identities

#: Fixed primary keys of our two v_dialplans rows (generated once for fsguard).
CHECK_DIALPLAN_UUID = "3e445bb1-5737-46df-9f3a-d2f2fb68e855"
GUARD_DIALPLAN_UUID = "abf22abe-7e90-48c0-85c2-45231a083abf"
#: app_uuid of the XML templates (freeswitch-conf/fusionpbx/*.xml); FusionPBX's
#: importer skips a template whose app_uuid is already in v_dialplans.
CHECK_APP_UUID = "35f32d72-fbe9-4142-81be-75bd502f0c45"
GUARD_APP_UUID = "90c7e99b-e725-4029-a1df-d97c511a0ba4"
#: Namespace of the detail rows' uuids: uuid5(namespace, "<dialplan_uuid>/<order>"),
#: so a re-install writes the same detail uuids.
DETAIL_NAMESPACE = uuid.UUID("d6f778a1-199c-4bf7-b17d-0c9cc370f4dd")

OUR_DIALPLAN_UUIDS = (CHECK_DIALPLAN_UUID, GUARD_DIALPLAN_UUID)
OUR_APP_UUIDS = (CHECK_APP_UUID, GUARD_APP_UUID)

DEFAULT_ADDRESS = "127.0.0.1:8084"
MODES = ("sync", "async")
PASSWORD_ENV = "FSGUARD_FUSIONPBX_PASSWORD"
GUARD_ORDER = 12
#: Serialises concurrent fsguard installers (pg_advisory_xact_lock key).
_LOCK_KEY = 0x46534755415244  # "FSGUARD"

EMERGENCY = "911|933|112|999|000|110|119"


class FusionPBXError(Exception):
    """A failure with a message for the operator (never holds the password)."""

    exit_code = 1


class DatabaseUnavailable(FusionPBXError):
    exit_code = 69  # EX_UNAVAILABLE, as fsguard.daemon


class NotFusionPBX(FusionPBXError):
    exit_code = 65  # EX_DATAERR


class Conflict(FusionPBXError):
    exit_code = 65


# --- what we install


@dataclass(frozen=True)
class Detail:
    tag: str  # condition | action | anti-action
    type: str  # condition: field; action: application
    data: str  # condition: expression; action: data
    order: int
    group: int = 0
    brk: str | None = None  # dialplan_detail_break
    inline: str | None = None  # dialplan_detail_inline


@dataclass(frozen=True)
class Entry:
    key: str  # "check" | "guard"
    dialplan_uuid: str
    app_uuid: str
    name: str
    order: int
    continue_: bool
    description: str
    details: tuple[Detail, ...]

    @property
    def xml(self) -> str:
        return dialplan_xml(self)


def socket_data(address: str, mode: str) -> str:
    """The data of the guard's ``socket`` action: ``HOST:PORT [async] full``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    host, port = parse_address(address)
    return f"{host}:{port} {'async ' if mode == 'async' else ''}full"


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) -> (host, port); ValueError if malformed.

    FreeSWITCH's ``socket`` splits the port off at the *last* colon, so an IPv6
    address is written without brackets (``::1:8084``).
    """
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535
            or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host)):
        raise ValueError(f"must be HOST:PORT (IPv6 as [ADDR]:PORT), got {address!r}")
    return host, int(port)


def parse_socket_data(data: str) -> tuple[str, str] | None:
    """``127.0.0.1:8084 async full`` -> ("127.0.0.1:8084", "async"); None if not ours."""
    match = re.fullmatch(r"(\S+?)(?::(\d+))? (async )?full", data or "")
    if not match:
        return None
    host, port = match.group(1), match.group(2) or "8084"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}", "async" if match.group(3) else "sync"


def _numbered(tag_type_data: Iterable[tuple[str, str, str]]) -> tuple[Detail, ...]:
    """Orders 5, 10, 15, ... group 0: how import() numbers a template whose only
    condition with actions is the last one (both of ours)."""
    return tuple(Detail(tag, type_, data, 5 * (n + 1)) for n, (tag, type_, data) in enumerate(tag_type_data))


def entries(address: str = DEFAULT_ADDRESS, mode: str = "sync") -> tuple[Entry, Entry]:
    """The check (005) and the guard (012), with fsguard at ``address`` in ``mode``."""
    identity = "identity=${sip_auth_username}@${sip_auth_realm} source=${sip_network_ip}"
    check = Entry(
        key="check",
        dialplan_uuid=CHECK_DIALPLAN_UUID,
        app_uuid=CHECK_APP_UUID,
        name="fsguard-verdict-check",
        order=5,
        continue_=False,
        description="fsguard: refuse the call (603) unless fsguard set fsguard_verdict=allow",
        details=_numbered([
            ("condition", "destination_number", "^fsguard-verdict-check$"),
            ("condition", "${fsguard_verdict}", "^allow$"),
            ("action", "log", f"INFO fsguard: allowed uuid=${{uuid}} {identity} reason=${{fsguard_reason}}"),
            ("anti-action", "log",
             "WARNING fsguard: REFUSED by dialplan check (no allow verdict: fsguard down, silent or crashed?) "
             f"uuid=${{uuid}} {identity} verdict=[${{fsguard_verdict}}] reason=[${{fsguard_reason}}]"),
            ("anti-action", "hangup", "CALL_REJECTED"),
        ]),
    )
    guard = Entry(
        key="guard",
        dialplan_uuid=GUARD_DIALPLAN_UUID,
        app_uuid=GUARD_APP_UUID,
        name="fsguard",
        order=GUARD_ORDER,
        continue_=True,
        description="fsguard: ask the fsguard daemon about every digest-authenticated call (fail closed)",
        details=_numbered([
            ("condition", "${sip_auth_username}", "^.+$"),
            ("condition", "${fsguard_checked}", "^$"),
            ("condition", "destination_number", f"^(?!(?:{EMERGENCY}|fsguard-verdict-check)$)"),
            ("action", "set", "fsguard_checked=true"),
            ("action", "unset", "fsguard_verdict"),
            ("action", "unset", "fsguard_reason"),
            ("action", "set", "park_timeout=5:CALL_REJECTED"),
            ("action", "socket", socket_data(address, mode)),
            ("action", "unset", "park_timeout"),
            ("action", "execute_extension", "fsguard-verdict-check XML ${context}"),
        ]),
    )
    return check, guard


_TAG_RANK = {"condition": 1, "action": 2, "anti-action": 3}


def _sorted(details: Iterable[Detail]) -> list[Detail]:
    """FusionPBX's order: group, then conditions/actions/anti-actions, then order."""
    return sorted(details, key=lambda d: (d.group, _TAG_RANK.get(d.tag, 100), d.order))


def _attr(value: str) -> str:
    return escape(value, {'"': "&quot;"})


def dialplan_xml(entry: Entry) -> str:
    """``v_dialplans.dialplan_xml`` as ``dialplan::xml()`` renders it from the details.

    Conditions without actions are self-closing; actions and anti-actions sit
    in the condition before them; one tab per level; ``break``/``inline`` only
    when set.  (FusionPBX writes the values unescaped; ours need no escaping.)
    """
    lines = [f'<extension name="{_attr(entry.name)}" continue="{str(entry.continue_).lower()}" '
             f'uuid="{entry.dialplan_uuid}">']
    pending: str | None = None  # a condition whose end is not written yet
    open_condition = False
    group: int | None = None
    for detail in _sorted(entry.details):
        if group is not None and detail.group != group:
            if pending:
                lines.append(pending + "/>")
            elif open_condition:
                lines.append("\t</condition>")
            pending, open_condition = None, False
        group = detail.group
        if detail.tag == "condition":
            if pending:
                lines.append(pending + "/>")
            brk = f' break="{_attr(detail.brk)}"' if detail.brk else ""
            pending = f'\t<condition field="{_attr(detail.type)}" expression="{_attr(detail.data)}"{brk}'
            open_condition = False
        else:
            if pending:
                lines.append(pending + ">")
                pending, open_condition = None, True
            inline = f' inline="{_attr(detail.inline)}"' if detail.inline else ""
            lines.append(f'\t\t<{detail.tag} application="{_attr(detail.type)}" data="{_attr(detail.data)}"{inline}/>')
    if pending:
        lines.append(pending + "/>")
    elif open_condition:
        lines.append("\t</condition>")
    lines.append("</extension>")
    return "\n".join(lines) + "\n"


def detail_uuid(entry: Entry, detail: Detail) -> str:
    return str(uuid.uuid5(DETAIL_NAMESPACE, f"{entry.dialplan_uuid}/{detail.order}"))


# --- the database


class TextFlag(TypeDecorator):
    """A FusionPBX flag stored as text: 'true' / 'false' (older FusionPBX)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else ("true" if value else "false")


class UuidText(TypeDecorator):
    """A uuid column, bound and read as a string, shown dashed in the dry run's SQL."""

    impl = sa.Uuid(as_uuid=False)
    cache_ok = True

    def literal_processor(self, dialect: Any) -> Any:
        return lambda value: "NULL" if value is None else f"'{uuid.UUID(str(value))}'"


@dataclass
class Schema:
    """The two FusionPBX tables as this database has them (flag columns typed)."""

    dialplans: sa.Table
    details: sa.Table
    flag_types: dict[str, str]  # column -> boolean | text


#: The columns used (FusionPBX: app/dialplans/app_config.php).  FusionPBX creates
#: them all nullable, without defaults, only the uuid primary keys
#: (resources/classes/schema.php); it declares no foreign key constraints.
DIALPLAN_COLUMNS = (
    "dialplan_uuid", "domain_uuid", "app_uuid", "hostname", "dialplan_context", "dialplan_name",
    "dialplan_number", "dialplan_destination", "dialplan_continue", "dialplan_xml", "dialplan_order",
    "dialplan_enabled", "dialplan_description", "insert_date", "insert_user", "update_date", "update_user",
)
DETAIL_COLUMNS = (
    "dialplan_detail_uuid", "domain_uuid", "dialplan_uuid", "dialplan_detail_tag", "dialplan_detail_type",
    "dialplan_detail_data", "dialplan_detail_break", "dialplan_detail_inline", "dialplan_detail_group",
    "dialplan_detail_order", "dialplan_detail_enabled", "insert_date", "insert_user", "update_date", "update_user",
)
FLAG_COLUMNS = ("dialplan_destination", "dialplan_continue", "dialplan_enabled")


def tables(flag_types: dict[str, str]) -> tuple[sa.Table, sa.Table]:
    """Explicit Core definitions of v_dialplans / v_dialplan_details (only our columns)."""

    def flag(name: str) -> Any:
        return sa.Boolean() if flag_types.get(name) == "boolean" else TextFlag()

    uid = UuidText()
    metadata = sa.MetaData()
    dialplans = sa.Table(
        "v_dialplans", metadata,
        sa.Column("dialplan_uuid", uid, primary_key=True),
        sa.Column("domain_uuid", uid),
        sa.Column("app_uuid", uid),
        sa.Column("hostname", sa.Text),
        sa.Column("dialplan_context", sa.Text),
        sa.Column("dialplan_name", sa.Text),
        sa.Column("dialplan_number", sa.Text),
        sa.Column("dialplan_destination", flag("dialplan_destination")),
        sa.Column("dialplan_continue", flag("dialplan_continue")),
        sa.Column("dialplan_xml", sa.Text),
        sa.Column("dialplan_order", sa.Numeric),
        sa.Column("dialplan_enabled", flag("dialplan_enabled")),
        sa.Column("dialplan_description", sa.Text),
        sa.Column("insert_date", sa.DateTime(timezone=True)),
        sa.Column("insert_user", uid),
        sa.Column("update_date", sa.DateTime(timezone=True)),
        sa.Column("update_user", uid),
    )
    details = sa.Table(
        "v_dialplan_details", metadata,
        sa.Column("dialplan_detail_uuid", uid, primary_key=True),
        sa.Column("domain_uuid", uid),
        sa.Column("dialplan_uuid", uid),
        sa.Column("dialplan_detail_tag", sa.Text),
        sa.Column("dialplan_detail_type", sa.Text),
        sa.Column("dialplan_detail_data", sa.Text),
        sa.Column("dialplan_detail_break", sa.Text),
        sa.Column("dialplan_detail_inline", sa.Text),
        sa.Column("dialplan_detail_group", sa.Numeric),
        sa.Column("dialplan_detail_order", sa.Numeric),
        sa.Column("dialplan_detail_enabled", sa.Boolean),
        sa.Column("insert_date", sa.DateTime(timezone=True)),
        sa.Column("insert_user", uid),
        sa.Column("update_date", sa.DateTime(timezone=True)),
        sa.Column("update_user", uid),
    )
    return dialplans, details


def resolve_url(url: str, environ: dict[str, str] | None = None) -> URL:
    """The URL to connect with: psycopg 3 driver; password from FSGUARD_FUSIONPBX_PASSWORD if the URL has none."""
    environ = os.environ if environ is None else environ
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the message would echo the URL, password included
        raise FusionPBXError(
            "invalid database URL (expected postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE)"
        ) from None
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise FusionPBXError(f"{safe_url(parsed)}: only PostgreSQL FusionPBX databases are supported "
                             "(postgresql+psycopg://USER@HOST/DATABASE)")
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername != "postgresql+psycopg":
        raise FusionPBXError(f"{safe_url(parsed)}: use the psycopg (3) driver: postgresql+psycopg://...")
    if parsed.password is None and environ.get(PASSWORD_ENV):
        parsed = parsed.set(password=environ[PASSWORD_ENV])
    return parsed


def safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _scrub(text: str, url: URL) -> str:
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def describe(exc: BaseException, url: URL) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()] or [type(orig).__name__]
    return _scrub(lines[0], url)


@contextmanager
def transaction(url: URL, commit: bool = True) -> Iterator[Connection]:
    """One connection, one transaction: committed if the block ends normally and ``commit``.

    With ``commit=False`` (dry run, status) the transaction is READ ONLY and
    rolled back: nothing can be written.
    """
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool,
                              connect_args={"connect_timeout": 10, "application_name": "fsguard fusionpbx"})
    try:
        try:
            connection = engine.connect()
        except sa.exc.DBAPIError as exc:
            message = describe(exc, url)
            hint = ""
            if "password" in message.lower():
                hint = (f"; give the password in the URL or in {PASSWORD_ENV} (FusionPBX keeps it in "
                        "/etc/fusionpbx/config.conf, database.0.password)")
            raise DatabaseUnavailable(f"cannot connect to the FusionPBX database at {safe_url(url)}: "
                                      f"{message}{hint}") from None
        with connection:
            trans = connection.begin()
            try:
                if not commit:
                    connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                connection.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
                yield connection
                if commit:
                    trans.commit()
                else:
                    trans.rollback()
            except sa.exc.DBAPIError as exc:
                trans.rollback()
                raise FusionPBXError(f"database error at {safe_url(url)} (nothing written): "
                                     f"{describe(exc, url)}") from None
            except BaseException:
                trans.rollback()
                raise
    finally:
        engine.dispose()


def load_schema(connection: Connection) -> Schema:
    """The FusionPBX tables as found through the search path; NotFusionPBX if absent."""
    found: dict[str, dict[str, str]] = {}
    for table, needed in (("v_dialplans", DIALPLAN_COLUMNS), ("v_dialplan_details", DETAIL_COLUMNS)):
        rows = connection.execute(sa.text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(:table) AND a.attnum > 0 AND NOT a.attisdropped"
        ), {"table": table}).all()
        if not rows:
            raise NotFusionPBX(f"this database does not look like FusionPBX: table {table} missing")
        columns = {name: type_ for name, type_ in rows}
        missing = [c for c in needed if c not in columns]
        if missing:
            raise NotFusionPBX(f"table {table} lacks column(s) {', '.join(missing)}: "
                               "not a FusionPBX version this installer knows")
        found[table] = columns
    flag_types = {c: ("boolean" if found["v_dialplans"][c] == "boolean" else "text") for c in FLAG_COLUMNS}
    dialplans, details = tables(flag_types)
    return Schema(dialplans, details, flag_types)


# --- reading


def flag(value: Any) -> bool:
    """A FusionPBX flag as FusionPBX's queries test it (= 'true'): only true/'true' is true."""
    return value is True or value == "true"


def _text(value: Any) -> str | None:
    """Empty text is NULL for FusionPBX (database::save() stores '' as NULL)."""
    return None if value is None or value == "" else str(value)


def _number(value: Any) -> Decimal | None:
    try:
        return None if value is None or value == "" else Decimal(str(value))
    except ArithmeticError:
        return None


def _order_label(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "none"
    return str(int(number)) if number == number.to_integral_value() else str(number)


@dataclass(frozen=True)
class Row:
    """A v_dialplans row as status and install compare it."""

    dialplan_uuid: str
    domain_uuid: str | None
    app_uuid: str | None
    hostname: str | None
    context: str | None
    name: str | None
    number: str | None
    destination: bool
    continue_: bool
    xml: str | None
    order: Decimal | None
    enabled: bool
    description: str | None
    details: tuple[tuple[Any, ...], ...] = ()

    @classmethod
    def from_db(cls, row: Any, details: Iterable[tuple[Any, ...]] = ()) -> Row:
        return cls(
            dialplan_uuid=str(row.dialplan_uuid),
            domain_uuid=_text(row.domain_uuid),
            app_uuid=_text(row.app_uuid),
            hostname=_text(row.hostname),
            context=_text(row.dialplan_context),
            name=_text(row.dialplan_name),
            number=_text(row.dialplan_number),
            destination=flag(row.dialplan_destination),
            continue_=flag(row.dialplan_continue),
            xml=row.dialplan_xml,
            order=_number(row.dialplan_order),
            enabled=flag(row.dialplan_enabled),
            description=_text(row.dialplan_description),
            details=tuple(details),
        )

    @property
    def order_label(self) -> str:
        return _order_label(self.order)

    def describe(self) -> str:
        where = f"context {self.context or '(none)'}"
        if self.domain_uuid:
            where += f", domain {self.domain_uuid}"
        if self.hostname:
            where += f", host {self.hostname}"
        return (f"'{self.name}' (order {self.order_label}, {where}, continue {str(self.continue_).lower()}, "
                f"{'enabled' if self.enabled else 'disabled'}, dialplan_uuid {self.dialplan_uuid}, "
                f"app_uuid {self.app_uuid or 'none'})")


def _detail_key(row: Any) -> tuple[Any, ...]:
    """A detail as compared: (group, tag, order, type, data, break, inline, enabled, domain_uuid)."""
    return (_number(row.dialplan_detail_group) or Decimal(0), row.dialplan_detail_tag,
            _number(row.dialplan_detail_order), _text(row.dialplan_detail_type), _text(row.dialplan_detail_data),
            _text(row.dialplan_detail_break), _text(row.dialplan_detail_inline),
            row.dialplan_detail_enabled is None or flag(row.dialplan_detail_enabled), _text(row.domain_uuid))


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return (key[0], _TAG_RANK.get(key[1], 100), key[2] if key[2] is not None else Decimal(-1))


def expected(entry: Entry) -> Row:
    """The row (and details) install writes for ``entry``."""
    return Row(
        dialplan_uuid=entry.dialplan_uuid, domain_uuid=None, app_uuid=entry.app_uuid, hostname=None,
        context="global", name=entry.name, number=None, destination=False, continue_=entry.continue_,
        xml=entry.xml, order=Decimal(entry.order), enabled=True, description=entry.description,
        details=tuple(sorted(((Decimal(d.group), d.tag, Decimal(d.order), d.type, d.data, d.brk, d.inline, True, None)
                              for d in entry.details), key=_sort_key)),
    )


_COMPARED = (
    ("domain_uuid", "domain_uuid"), ("app_uuid", "app_uuid"), ("hostname", "hostname"),
    ("context", "dialplan_context"), ("name", "dialplan_name"), ("number", "dialplan_number"),
    ("destination", "dialplan_destination"), ("continue_", "dialplan_continue"), ("order", "dialplan_order"),
    ("description", "dialplan_description"),
)


def _show(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Decimal):
        return _order_label(value)
    return repr(value)


def _show_detail(key: tuple[Any, ...]) -> str:
    group, tag, order, type_, data, brk, inline, enabled, domain = key
    extra = "".join(f" {name}={_show(value)}" for name, value, default in (
        ("group", group, Decimal(0)), ("break", brk, None), ("inline", inline, None), ("enabled", enabled, True),
        ("domain_uuid", domain, None)) if value != default)
    return f"{_order_label(order)} {tag} {type_} {data!r}{extra}"


def differences(actual: Row, wanted: Row) -> list[str]:
    """What differs between an installed row and what this version installs (enabled aside)."""
    out = [f"{column}: {_show(getattr(actual, attr))} -> {_show(getattr(wanted, attr))}"
           for attr, column in _COMPARED if getattr(actual, attr) != getattr(wanted, attr)]
    if actual.details != wanted.details:
        have, want = set(actual.details), set(wanted.details)
        out += [f"detail - {_show_detail(k)}" for k in sorted(have - want, key=_sort_key)]
        out += [f"detail + {_show_detail(k)}" for k in sorted(want - have, key=_sort_key)]
        if have == want:
            out.append("details: duplicated rows")
    if actual.xml != wanted.xml:
        out.append("dialplan_xml: differs" + (" (NULL)" if actual.xml is None else ""))
    return out


def _served_to_domains(context: str | None) -> bool:
    """Is a row with this context part of a domain's (non-public) context? (dialplan.lua)"""
    if not context:
        return False
    return not (context == "public" or context.startswith("public@") or context.endswith(".public"))


@dataclass
class State:
    schema: Schema
    ours: dict[str, Row]  # dialplan_uuid -> row
    foreign: list[Row]  # not ours, but fsguard's app_uuid or one of our names
    early: list[Row]  # not ours, order <= 12, served to domain contexts

    def bypasses(self) -> list[Row]:
        """Enabled rows ordered before the guard that stop the hunt: they route calls without fsguard."""
        return [r for r in self.early
                if r.enabled and not r.continue_ and r.order is not None and r.order < GUARD_ORDER]

    def shared_orders(self, orders: Iterable[int]) -> list[Row]:
        """Enabled rows on our orders: FusionPBX sorts by dialplan_order only, ties come in any order."""
        wanted = {Decimal(o) for o in orders}
        return [r for r in self.early if r.enabled and r.order in wanted]


def read_state(connection: Connection, schema: Schema) -> State:
    d, s = schema.dialplans, schema.details
    ours: dict[str, Row] = {}
    rows = connection.execute(sa.select(d).where(d.c.dialplan_uuid.in_(OUR_DIALPLAN_UUIDS))).all()
    for row in rows:
        detail_rows = connection.execute(sa.select(s).where(s.c.dialplan_uuid == row.dialplan_uuid)).all()
        ours[str(row.dialplan_uuid)] = Row.from_db(row, sorted((_detail_key(r) for r in detail_rows), key=_sort_key))
    names = [e.name for e in entries()]
    foreign = [Row.from_db(r) for r in connection.execute(
        sa.select(d).where(d.c.dialplan_uuid.not_in(OUR_DIALPLAN_UUIDS),
                           sa.or_(d.c.app_uuid.in_(OUR_APP_UUIDS), d.c.dialplan_name.in_(names)))
        .order_by(d.c.dialplan_order, d.c.dialplan_name)).all()]
    early = [Row.from_db(r) for r in connection.execute(
        sa.select(d).where(d.c.dialplan_uuid.not_in(OUR_DIALPLAN_UUIDS), d.c.dialplan_order <= GUARD_ORDER)
        .order_by(d.c.dialplan_order, d.c.dialplan_name, d.c.dialplan_uuid)).all()]
    early = [r for r in early if _served_to_domains(r.context)]
    return State(schema, ours, foreign, early)


# --- writing


@dataclass
class Change:
    entry: Entry
    action: str  # insert | update | unchanged | delete | absent
    differences: list[str] = field(default_factory=list)
    was_enabled: bool | None = None


@dataclass
class Step:
    """One statement; ``shown``: the same as single-row inserts, for the dry run's listing."""

    statement: sa.Executable
    shown: list[sa.Executable] = field(default_factory=list)


@dataclass
class Plan:
    changes: list[Change]
    steps: list[Step]

    @property
    def writes(self) -> bool:
        return bool(self.steps)


def _row_values(entry: Entry) -> dict[str, Any]:
    return {
        "domain_uuid": None,
        "app_uuid": entry.app_uuid,
        "hostname": None,
        "dialplan_context": "global",
        "dialplan_name": entry.name,
        "dialplan_number": None,
        "dialplan_destination": None,
        "dialplan_continue": entry.continue_,
        "dialplan_xml": entry.xml,
        "dialplan_order": Decimal(entry.order),
        "dialplan_enabled": True,
        "dialplan_description": entry.description,
    }


def _insert(table: sa.Table, rows: list[dict[str, Any]]) -> Step:
    return Step(sa.insert(table).values(rows), [sa.insert(table).values(row) for row in rows])


def _entry_insert(schema: Schema, entry: Entry) -> Step:
    return _insert(schema.dialplans, [{"dialplan_uuid": entry.dialplan_uuid, **_row_values(entry),
                                       "insert_date": sa.func.now(), "insert_user": None}])


def _detail_insert(schema: Schema, entry: Entry) -> Step:
    return _insert(schema.details, [{
        "dialplan_detail_uuid": detail_uuid(entry, detail),
        "domain_uuid": None,
        "dialplan_uuid": entry.dialplan_uuid,
        "dialplan_detail_tag": detail.tag,
        "dialplan_detail_type": detail.type,
        "dialplan_detail_data": detail.data,
        "dialplan_detail_break": detail.brk,
        "dialplan_detail_inline": detail.inline,
        "dialplan_detail_group": Decimal(detail.group),
        "dialplan_detail_order": Decimal(detail.order),
        "dialplan_detail_enabled": True,
        "insert_date": sa.func.now(),
        "insert_user": None,
    } for detail in _sorted(entry.details)])


def check_conflicts(state: State) -> None:
    """Conflict if fsguard's entries already exist under other uuids (hand-entered or imported)."""
    if state.foreign:
        listed = "\n  ".join(r.describe() for r in state.foreign)
        raise Conflict(
            "v_dialplans already holds fsguard entries that this installer did not write (same name or "
            f"app_uuid, another dialplan_uuid):\n  {listed}\n"
            "Entered by hand in Dialplan Manager or imported by App Defaults?  Installing as well would run "
            "fsguard twice per call.  fsguard never deletes rows it did not write: delete those in FusionPBX "
            "(Dialplan > Dialplan Manager), then run install again."
        )


def plan_install(state: State, wanted: Iterable[Entry]) -> Plan:
    """Insert missing entries, update differing ones in place (matched by dialplan_uuid)."""
    check_conflicts(state)
    d, s = state.schema.dialplans, state.schema.details
    changes, steps = [], []
    for entry in wanted:  # the check first: the guard without the check is fail-open
        row = state.ours.get(entry.dialplan_uuid)
        if row is None:
            changes.append(Change(entry, "insert"))
            steps += [_entry_insert(state.schema, entry), _detail_insert(state.schema, entry)]
            continue
        diff = differences(row, expected(entry))
        if not diff and row.enabled:
            changes.append(Change(entry, "unchanged", was_enabled=True))
            continue
        changes.append(Change(entry, "update", diff, was_enabled=row.enabled))
        steps.append(Step(sa.update(d).where(d.c.dialplan_uuid == entry.dialplan_uuid)
                          .values(**_row_values(entry), update_date=sa.func.now(), update_user=None)))
        steps.append(Step(sa.delete(s).where(s.c.dialplan_uuid == entry.dialplan_uuid)))
        steps.append(_detail_insert(state.schema, entry))
    return Plan(changes, steps)


def plan_uninstall(state: State) -> Plan:
    """Delete our two rows and their details, by our dialplan_uuids; nothing else."""
    d, s = state.schema.dialplans, state.schema.details
    changes, steps = [], []
    for entry in reversed(entries()):  # the guard first: never leave a guard without its check
        if entry.dialplan_uuid in state.ours:
            changes.append(Change(entry, "delete"))
            steps.append(Step(sa.delete(s).where(s.c.dialplan_uuid == entry.dialplan_uuid)))
            steps.append(Step(sa.delete(d).where(d.c.dialplan_uuid == entry.dialplan_uuid)))
        else:
            changes.append(Change(entry, "absent"))
    return Plan(changes, steps)


def lock(connection: Connection) -> None:
    """Serialise concurrent fsguard installers on this database (released at commit/rollback)."""
    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))


def execute(connection: Connection, plan: Plan) -> None:
    for step in plan.steps:
        connection.execute(step.statement)


def _literal(connection: Connection, statement: sa.Executable) -> str:
    return str(statement.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))


def render_sql(connection: Connection, step: Step) -> str:
    """A step as SQL with its values inlined (the dry run); inserts one row per line."""
    if not step.shown:
        return _literal(connection, step.statement) + ";"
    compiled = [_literal(connection, statement) for statement in step.shown]
    head = compiled[0].split(" VALUES ", 1)[0]  # the column list holds no data: its " VALUES " is the first
    return head + " VALUES\n" + ",\n".join(c.split(" VALUES ", 1)[1] for c in compiled) + ";"


# --- status


@dataclass
class EntryStatus:
    entry: Entry  # as this version installs it, with the installed address/mode
    row: Row | None
    address: str | None = None
    mode: str | None = None
    differences: list[str] = field(default_factory=list)

    @property
    def installed(self) -> bool:
        return self.row is not None

    @property
    def matches(self) -> bool:
        return self.row is not None and not self.differences


def installed_socket(row: Row | None) -> tuple[str, str] | None:
    if row is None:
        return None
    for key in row.details:
        if key[1] == "action" and key[3] == "socket":
            return parse_socket_data(key[4] or "")
    return None


def entry_statuses(state: State) -> list[EntryStatus]:
    guard_row = state.ours.get(GUARD_DIALPLAN_UUID)
    socket = installed_socket(guard_row)
    address, mode = socket if socket else (DEFAULT_ADDRESS, "sync")
    try:
        wanted = entries(address, mode)
    except ValueError:
        wanted, socket = entries(), None
    out = []
    for entry in wanted:
        row = state.ours.get(entry.dialplan_uuid)
        status = EntryStatus(entry, row)
        if row is not None:
            status.differences = differences(row, expected(entry))
        if entry.key == "guard" and socket:
            status.address, status.mode = socket
        out.append(status)
    return out

