"""``fsguard fusionpbx install|uninstall|status``: fsguard's dialplan entries in FusionPBX's database.

Imported by ``fsguard.cli`` when the command line starts: SQLAlchemy is
imported inside the commands (``fsguard.fusionpbx``), after gevent patched.

Exit codes: 0 done / all well; 1 status found a problem (not installed,
disabled, different from this version, fail-open, foreign fsguard entries)
or a database error or an unusable URL; 2 usage; 65 not a FusionPBX
database or a conflicting entry; 69 the database cannot be reached.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from .fusionpbx import State

DEFAULT_ADDRESS = "127.0.0.1:8084"  # as fsguard.fusionpbx.DEFAULT_ADDRESS (not imported: SQLAlchemy)
PASSWORD_ENV = "FSGUARD_FUSIONPBX_PASSWORD"

_DB_URL = click.option(
    "--db-url", required=True, metavar="URL",
    help="FusionPBX's PostgreSQL, e.g. postgresql+psycopg://fusionpbx@127.0.0.1/fusionpbx; without a password "
         f"in the URL, {PASSWORD_ENV} is used (FusionPBX's is database.0.password in /etc/fusionpbx/config.conf).",
)
_DRY_RUN = click.option("--dry-run", is_flag=True, help="Print the SQL it would run; write nothing.")


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from .fusionpbx import parse_address

    try:
        parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.strip()


@click.group()
def fusionpbx() -> None:
    """fsguard's two global dialplan entries in FusionPBX's database (no hand-editing).

    005 fsguard-verdict-check (the check) and 012 fsguard (the guard), as in
    freeswitch-conf/fusionpbx/; found and changed only by their fixed uuids.
    """


def _fail(exc: Exception) -> NoReturn:
    click.echo(f"fsguard: {exc}", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


def _url(db_url: str) -> URL:
    from .fusionpbx import FusionPBXError, resolve_url

    try:
        return resolve_url(db_url)
    except FusionPBXError as exc:
        _fail(exc)


def _title(entry: Any) -> str:
    return f"{entry.name} (order {entry.order}, continue {str(entry.continue_).lower()})"


def _warnings(state: State, echo: Any = click.echo) -> None:
    bypasses = state.bypasses()
    if bypasses:
        echo(f"WARNING: {len(bypasses)} enabled entr{'y' if len(bypasses) == 1 else 'ies'} ordered before fsguard "
             "(order < 12) without continue: a call such an entry matches is routed WITHOUT fsguard:")
        for row in bypasses:
            echo(f"  {row.describe()}")
        echo("  Move them to order 13 or later, or set continue=true, unless they never match a call with "
             "credentials (see freeswitch-conf/fusionpbx/README.rst).")
    shared = state.shared_orders((5, 12))
    if shared:
        echo("WARNING: entries sharing fsguard's orders (FusionPBX sorts by dialplan_order only, ties run in "
             "any order):")
        for row in shared:
            echo(f"  {row.describe()}")


def _follow_up(echo: Any = click.echo) -> None:
    echo("Next, on every FreeSWITCH server using this database, clear FusionPBX's dialplan cache (it keeps each "
         "context's dialplan, by default for an hour; Dialplan Manager clears it after a save):")
    echo("  cache.method = file (the default, /etc/fusionpbx/config.conf):  rm -f /var/cache/fusionpbx/dialplan.*"
         "  (or your cache.location)")
    echo("  cache.method = memcache:  fs_cli -x 'memcache flush'")
    echo("  or in FusionPBX: Status > SIP Status > Flush Cache")
    echo("No reloadxml needed: FusionPBX's XML handler reads the dialplan from the database on each call "
         "(Dialplan Manager does not run reloadxml after a save either).")
    echo("Then test a call as in freeswitch-conf/fusionpbx/README.rst, section Verify.")


def _run_plan(command: str, url: str, dry_run: bool, make_plan):
    """One transaction: read FusionPBX's state, plan, then print (dry run) or write the plan."""
    from . import fusionpbx as fp

    try:
        with fp.transaction(url, commit=not dry_run) as connection:
            schema = fp.load_schema(connection)
            if not dry_run:
                fp.lock(connection)
            state = fp.read_state(connection, schema)
            plan = make_plan(state)
            if dry_run:
                _print_dry_run(command, url, plan, connection)
            else:
                fp.execute(connection, plan)
    except fp.FusionPBXError as exc:
        _fail(exc)
    return state, plan


@fusionpbx.command()
@_DB_URL
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True, callback=_address, metavar="HOST:PORT",
              help="Where fsguard listens for FreeSWITCH's outbound socket (the guard's socket action).")
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync", show_default=True,
              help="socket mode: sync (\"HOST:PORT full\") or async (\"HOST:PORT async full\").")
@_DRY_RUN
def install(db_url: str, address: str, mode: str, dry_run: bool) -> None:
    """Write the two entries (a second run updates them in place, or changes nothing)."""
    from . import fusionpbx as fp

    url = _url(db_url)
    try:
        wanted = fp.entries(address, mode)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address") from None
    state, plan = _run_plan("install", url, dry_run, lambda state: fp.plan_install(state, wanted))
    if dry_run:
        return
    click.echo(f"FusionPBX database {fp.safe_url(url)}:")
    for change in plan.changes:
        socket = f", socket {fp.socket_data(address, mode)}" if change.entry.key == "guard" else ""
        if change.action == "insert":
            click.echo(f"  {_title(change.entry)}: inserted{socket}")
        elif change.action == "unchanged":
            click.echo(f"  {_title(change.entry)}: already installed, enabled and identical{socket}")
        else:
            what = "updated in place" + ("" if change.was_enabled else " and enabled again")
            click.echo(f"  {_title(change.entry)}: {what}{socket}")
            for line in change.differences:
                click.echo(f"      {line}")
    _warnings(state)
    if plan.writes:
        click.echo("Committed.")
        _follow_up()
    else:
        click.echo("Nothing to write.")


@fusionpbx.command()
@_DB_URL
@_DRY_RUN
def uninstall(db_url: str, dry_run: bool) -> None:
    """Delete the two entries and their details, nothing else (found by their uuids)."""
    from . import fusionpbx as fp

    url = _url(db_url)
    state, plan = _run_plan("uninstall", url, dry_run, fp.plan_uninstall)
    if dry_run:
        return
    click.echo(f"FusionPBX database {fp.safe_url(url)}:")
    for change in plan.changes:
        done = "deleted (with its details)" if change.action == "delete" else "not installed, nothing to delete"
        click.echo(f"  {_title(change.entry)}: {done}")
    if state.foreign:
        click.echo("Left untouched (not written by this installer; delete them in Dialplan Manager if they are "
                   "fsguard's):")
        for row in state.foreign:
            click.echo(f"  {row.describe()}")
    if plan.writes:
        click.echo("Committed.")
        _follow_up()
    else:
        click.echo("Nothing to delete.")


def _print_dry_run(command: str, url: URL, plan: Any, connection: Any) -> None:
    from . import fusionpbx as fp

    click.echo(f"-- fsguard fusionpbx {command} --dry-run: nothing is written (transaction rolled back)")
    click.echo(f"-- FusionPBX database {fp.safe_url(url)}")
    for change in plan.changes:
        action = {"insert": "would be inserted", "update": "would be updated in place",
                  "unchanged": "already installed, enabled and identical: untouched",
                  "delete": "would be deleted with its details", "absent": "not installed"}[change.action]
        click.echo(f"-- {_title(change.entry)}: {action}")
        for line in change.differences:
            click.echo(f"--     {line}")
    if not plan.writes:
        click.echo("-- nothing to write")
        return
    click.echo("BEGIN;")
    for step in plan.steps:
        click.echo(fp.render_sql(connection, step))
    click.echo("COMMIT;")


@fusionpbx.command()
@_DB_URL
def status(db_url: str) -> None:
    """Show whether the entries are installed, enabled and current, and what routes calls before them."""
    from . import fusionpbx as fp

    url = _url(db_url)
    try:
        with fp.transaction(url, commit=False) as connection:
            state = fp.read_state(connection, fp.load_schema(connection))
    except fp.FusionPBXError as exc:
        _fail(exc)
    click.echo(f"FusionPBX database {fp.safe_url(url)}:")
    problems: list[str] = []
    statuses = fp.entry_statuses(state)
    for st in statuses:
        entry, row = st.entry, st.row
        if row is None:
            click.echo(f"  {entry.name:<22} not installed")
            problems.append(f"{entry.name} not installed")
            continue
        parts = ["installed", "enabled" if row.enabled else "DISABLED", f"order {row.order_label}",
                 f"continue {str(row.continue_).lower()}"]
        if st.address:
            parts.append(f"socket {st.address} ({st.mode})")
        parts.append("matches this version" if st.matches else "DIFFERS from this version")
        click.echo(f"  {entry.name:<22} " + ", ".join(parts))
        for line in st.differences:
            click.echo(f"      {line}")
        if not row.enabled:
            problems.append(f"{entry.name} disabled")
        if not st.matches:
            problems.append(f"{entry.name} differs (run install to update it)")
    check, guard = statuses
    if guard.row is not None and guard.row.enabled and (check.row is None or not check.row.enabled):
        click.echo("FAIL-OPEN: the guard (012) is enabled without its check (005): execute_extension finds no "
                   "check and returns, so every call passes.  Run install, or disable the guard.")
        problems.append("fail-open")
    if state.foreign:
        click.echo("WARNING: fsguard entries not written by this installer (same name or app_uuid):")
        for row in state.foreign:
            click.echo(f"  {row.describe()}")
        problems.append("foreign fsguard entries")
    _warnings(state)
    if problems:
        click.echo("Status: NOT OK: " + "; ".join(problems) + ".")
        sys.exit(1)
    click.echo("Status: OK: both entries installed, enabled and current.")
