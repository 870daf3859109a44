"""``fsguard db`` (migrations) and ``fsguard audit`` (queries), reading the daemon's config.

Imported by ``fsguard.cli`` when the command line starts: SQLAlchemy and
Alembic are imported inside the commands, after gevent has patched.

Output formats: ``table`` (fits the terminal, 80 columns when not a
terminal), ``json`` (one object per line) and ``csv`` (a header line, then
rows).  Times are UTC, ISO 8601 in json and csv.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from ..policy import Reason
from .durations import parse_time

if TYPE_CHECKING:
    from sqlalchemy import Connection

EXIT_UNAVAILABLE = 69  # the database cannot be reached (as fsguard.daemon.EXIT_UNAVAILABLE)
EXIT_CONFIG = 78  # the configuration is invalid (as fsguard.daemon.EXIT_CONFIG)

_CONFIG = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), default="/etc/fsguard/fsguard.toml",
    show_default=True, help="TOML configuration file; its [audit] url is the database.",
)
_URL = click.option("--url", help="Database URL, instead of the config's [audit] url.")
_FORMAT = click.option(
    "--format", "output", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
    help="table (fits 80 columns), json (one object per line) or csv.",
)


class _Time(click.ParamType):
    """24h, 7d, 90d (that long ago) or an ISO date/time (UTC unless it has an offset)."""

    name = "TIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(value, datetime.now(UTC))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TIME = _Time()


def _url(config_path: str, url: str | None) -> str:
    if url:
        return url
    from ..config import ConfigError, load

    try:
        return load(config_path).audit.url
    except ConfigError as exc:
        click.echo(f"fsguard: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    from .store import AuditError, connect

    try:
        with connect(url) as connection:
            yield connection
    except AuditError as exc:
        click.echo(f"fsguard: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)


# --- fsguard db


@click.group()
def db() -> None:
    """The audit database's schema (Alembic migrations shipped with fsguard)."""


@db.command()
@_CONFIG
@_URL
@click.argument("revision", default="head")
def upgrade(config_path: str, url: str | None, revision: str) -> None:
    """Migrate the audit database up to REVISION (default: head); creates a SQLite file."""
    from alembic.util import CommandError

    from .store import AuditError, safe_url
    from .store import upgrade as migrate

    url = _url(config_path, url)
    try:
        before, after = migrate(url, revision)
    except AuditError as exc:
        click.echo(f"fsguard: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except CommandError as exc:  # e.g. an unknown revision
        raise click.ClickException(str(exc)) from None
    if before == after:
        click.echo(f"audit database at {safe_url(url)}: already at {after}")
    else:
        click.echo(f"audit database at {safe_url(url)}: upgraded from {before or 'empty'} to {after}")


@db.command()
@_CONFIG
@_URL
@click.argument("revision")
def downgrade(config_path: str, url: str | None, revision: str) -> None:
    """Migrate the audit database down to REVISION ("base": drop everything)."""
    import alembic.command
    from alembic.util import CommandError

    from .store import alembic_config, current_revision, safe_url

    url = _url(config_path, url)
    with _connection(url) as connection:
        try:
            alembic.command.downgrade(alembic_config(connection), revision)
        except CommandError as exc:
            raise click.ClickException(str(exc)) from None
        connection.commit()
        after = current_revision(connection)
    click.echo(f"audit database at {safe_url(url)}: now at {after or 'base (empty)'}")


@db.command()
@_CONFIG
@_URL
def current(config_path: str, url: str | None) -> None:
    """Show the audit database's revision and whether it is the latest (head)."""
    from .store import current_revision, head_revision, safe_url

    url = _url(config_path, url)
    head = head_revision()
    with _connection(url) as connection:
        revision = current_revision(connection)
    if revision == head:
        state = "(head)"
    else:
        state = f"(behind: head is {head}; run `fsguard db upgrade --config {config_path}`)"
    click.echo(f"audit database at {safe_url(url)}: {revision or 'empty'} {state}")


# --- fsguard audit


@click.group()
def audit() -> None:
    """Query the audit trail: what fsguard decided, for whom, and why.  Times are UTC."""


def _filters(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--since", type=TIME, help="From this time on: 24h, 7d (ago) or an ISO date/time."),
        click.option("--until", type=TIME, help="Before this time: 1h, 2d (ago) or an ISO date/time."),
        click.option("--verdict", type=click.Choice(["allow", "deny"])),
        click.option("--reason", type=click.Choice([r.value for r in Reason])),
        click.option("--domain", help="The call's domain (tenant)."),
        click.option("--user", help="The authenticated extension: 1001 (any domain) or 1001@tenant-a.test."),
        click.option("--ip", help="IP of the caller (or of the proxy it came through)."),
        click.option("--destination", help="Dialled number."),
        click.option("--call", help="Call UUID."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _make_filters(options: dict[str, Any]) -> Any:
    from .queries import Filters

    return Filters(**{name: options[name] for name in Filters.__dataclass_fields__})


@audit.command("list")
@_CONFIG
@_URL
@_filters
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="At most this many rows.")
@_FORMAT
def list_(config_path: str, url: str | None, limit: int, output: str, **options: Any) -> None:
    """Decisions, newest first."""
    from .queries import LIST_COLUMNS, list_decisions

    with _connection(_url(config_path, url)) as connection:
        rows = list_decisions(connection, _make_filters(options), limit)
    _emit(rows, LIST_COLUMNS, output, _list_table)


@audit.command()
@_CONFIG
@_URL
@_filters
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Rows in the top lists.")
@_FORMAT
def summary(config_path: str, url: str | None, top: int, output: str, **options: Any) -> None:
    """Counts by verdict and reason, top refused client IPs and extensions, per day.

    "Refused" includes calls observe mode let through that enforce would have refused.
    """
    from .queries import summary as query

    with _connection(_url(config_path, url)) as connection:
        rows = query(connection, _make_filters(options), top)
    _emit(rows, SUMMARY_COLUMNS, output, _summary_table)


@audit.command()
@_CONFIG
@_URL
@click.option("--older-than", "before", type=TIME, required=True, help="90d, 12w, or an ISO date.")
def purge(config_path: str, url: str | None, before: datetime) -> None:
    """Delete decisions older than --older-than (retention; run it from cron or a timer)."""
    from .queries import purge as query
    from .store import safe_url

    url = _url(config_path, url)
    with _connection(url) as connection:
        deleted = query(connection, before)
    click.echo(f"audit database at {safe_url(url)}: deleted {deleted} decisions before {_iso(before)}")


# --- output

SUMMARY_COLUMNS = ("section", "verdict", "reason", "ip", "extension", "ips", "day", "count")


def _emit(rows: list[dict[str, Any]], columns: Sequence[str], output: str, table: Callable[..., str]) -> None:
    if output == "json":
        for row in rows:
            click.echo(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False))
    elif output == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _plain(v) for k, v in row.items()} for row in rows)
    else:
        click.echo(table(rows, _width()), nl=False)


def _width() -> int:
    """The terminal's width; 80 when the output is not a terminal."""
    return shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80


def _plain(value: Any) -> Any:
    return _iso(value) if isinstance(value, datetime) else value


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _list_table(rows: list[dict[str, Any]], width: int) -> str:
    if not rows:
        return "no decisions match\n"
    observed = any(r["reason"] == "observe" for r in rows)
    body = [
        [
            r["at"].astimezone(UTC).strftime("%m-%d %H:%M:%S"),
            "(deny)" if r["reason"] == "observe" else r["verdict"],
            r["rule"] if r["reason"] == "observe" else r["reason"],
            f"{r['auth_user']}@{r['auth_realm']}" if r["auth_user"] else "-",
            r["client_ip"] or "-",
            r["destination"] or "-",
        ]
        for r in rows
    ]
    # USER and DESTINATION give way first; json and csv have every column in full.
    text = table(["UTC TIME", "VERDICT", "REASON", "USER", "CLIENT IP", "DEST"], body, width, {3, 5})
    if observed:
        text += "(deny): observe mode let the call through; enforce would have refused it\n"
    return text


def _summary_table(rows: list[dict[str, Any]], width: int) -> str:
    if not rows:
        return "no decisions match\n"
    by = {s: [r for r in rows if r["section"] == s] for s in ("verdict", "refused_ip", "refused_extension", "day")}
    days: dict[str, dict[str, int]] = {}
    for r in by["day"]:
        days.setdefault(r["day"], {"allow": 0, "deny": 0})[r["verdict"]] = r["count"]
    parts = [
        ("Decisions by verdict and reason", ["VERDICT", "REASON", "COUNT"],
         [[r["verdict"], r["reason"], r["count"]] for r in by["verdict"]]),
        ("Top refused client IPs", ["CLIENT IP", "REFUSED"], [[r["ip"], r["count"]] for r in by["refused_ip"]]),
        ("Top refused extensions", ["EXTENSION", "REFUSED", "FROM IPS"],
         [[r["extension"], r["count"], r["ips"]] for r in by["refused_extension"]]),
        ("Per day (UTC)", ["DAY", "TOTAL", "ALLOW", "DENY"],
         [[day, c["allow"] + c["deny"], c["allow"], c["deny"]] for day, c in days.items()]),
    ]
    return "\n".join(
        f"{title}\n" + (table(headers, body, width, {0, 1}) if body else "  none\n") for title, headers, body in parts
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], width: int, shrink: set[int]) -> str:
    """Aligned columns within ``width``; the ``shrink`` columns are cut (with …) to fit."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(headers))]
    gutter = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1
    while sum(widths) + gutter * (len(widths) - 1) > width:
        candidates = [i for i in shrink if widths[i] > 6]
        if not candidates:
            break
        widths[max(candidates, key=lambda i: widths[i])] -= 1

    def line(values: Sequence[str]) -> str:
        cut = [v if len(v) <= w else v[: w - 1] + "…" for v, w in zip(values, widths, strict=True)]
        fitted = [v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(cut, widths, strict=True))]
        return (" " * gutter).join(fitted).rstrip() + "\n"

    return line(list(headers)) + "".join(line(row) for row in cells)


__all__ = ["audit", "db", "table"]
