"""Configuration: one table of settings, validated once, failing fast.

Every setting has a section, name, default, validator and help text in
``SETTINGS``; the example config and the README's settings table are kept in
step with it by a test.  A bad value raises ConfigError naming the setting:
a guard running on silent defaults is worse than one that refuses to start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .policy import DEFAULT_EMERGENCY_NUMBERS, Action, ExtensionRules, Mode, Policy, Rules, Scope


class ConfigError(ValueError):
    """The configuration is not usable; the message names the setting."""


# --- validators: take the raw TOML value, return the typed one or raise ValueError


def _address(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError("must be a string HOST:PORT")
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT (IPv6 as [ADDR]:PORT), got {value!r}")
    return host, int(port)


def _choice(*choices: str) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return validate


def _seconds(low: float, high: float) -> Callable[[Any], float]:
    def validate(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            raise ValueError(f"must be a number of seconds in ({low}, {high}], got {value!r}")
        return float(value)

    return validate


def _count(low: int, high: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number in [{low}, {high}], got {value!r}")
        return value

    return validate


def _numbers(value: Any) -> tuple[str, ...]:
    allowed = set("0123456789+*#")
    if not isinstance(value, list) or not all(isinstance(v, str) and v and set(v) <= allowed for v in value):
        raise ValueError(f"must be a list of dialable numbers (digits, + * #), got {value!r}")
    return tuple(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _optional_address(value: Any) -> tuple[str, int] | None:
    if value == "":
        return None
    return _address(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _list_of(parse: Callable[[Any], Any], what: str, example: str) -> Callable[[Any], tuple]:
    def validate(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(f"must be a list of {what}, got {value!r}")
        items = []
        for item in value:
            try:
                items.append(parse(item))
            except (TypeError, ValueError, re.error) as exc:
                raise ValueError(f"{item!r} is not {example}: {exc}") from None
        return tuple(items)

    return validate


def _regex(item: Any) -> re.Pattern[str]:
    if not isinstance(item, str) or not item:
        raise ValueError("expected a non-empty string")
    return re.compile(item)


_cidrs = _list_of(lambda item: ipaddress.ip_network(item, strict=False), "CIDRs",
                  "an IP network (e.g. 192.0.2.0/24, 2001:db8::/32)")
_patterns = _list_of(_regex, "regular expressions", "a regular expression")


def _header(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", value):
        raise ValueError(f"must be a SIP header name such as X-AUTH-IP, got {value!r}")
    return value


def _secret(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string (value not shown)")
    return value


def _database_url(value: Any) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(_text(value))
    except ArgumentError as exc:
        raise ValueError(f"is not a database URL: {exc}") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"must be a sqlite:/// or postgresql+psycopg:// URL, got {url.get_backend_name()!r}")
    return value


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: Any
    validate: Callable[[Any], Any]
    help: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


REQUIRED = object()
INHERIT = object()  # per-domain / per-extension: take the global value

SETTINGS: tuple[Setting, ...] = (
    Setting("guard", "listen", "127.0.0.1:8084", _address,
            "ESL outbound address: where FreeSWITCH's socket application connects."),
    Setting("guard", "mode", "enforce", _choice("enforce", "observe", "off"),
            "enforce: refuse calls; observe: decide, log and audit, but allow every call; off: no checks "
            "(set per domain to roll out tenant by tenant)."),
    Setting("guard", "on_error", "deny", _choice("deny", "allow"),
            "Verdict when registrations cannot be checked (switch down, timeout, garbage)."),
    Setting("guard", "emergency_numbers", list(DEFAULT_EMERGENCY_NUMBERS), _numbers,
            "Destinations that are always allowed, whatever else is configured."),
    Setting("guard", "decision_timeout", 2.0, _seconds(0, 30),
            "Seconds a verdict may take; past it, on_error applies."),
    Setting("guard", "command_timeout", 5.0, _seconds(0, 60),
            "Seconds to wait for FreeSWITCH at each step of the outbound conversation."),
    Setting("guard", "max_connections", 1000, _count(1, 100_000),
            "Calls decided at once; past it, calls get the over_capacity verdict without a lookup."),
    Setting("guard", "over_capacity", "deny", _choice("deny", "allow"),
            "Verdict for a call that needs a lookup while max_connections calls are already being decided."),
    Setting("guard", "accept_from", [], _cidrs,
            "Addresses allowed to connect to guard.listen; empty: loopback and the [[switch]] hosts. "
            "Others are closed at once and counted."),
    Setting("guard", "registrations", "cache", _choice("cache", "live"),
            "cache: watch sofia events and answer from memory (live lookups only where the cache "
            "cannot know); live: one sofia xmlstatus lookup per call."),
    Setting("guard", "expiry_margin", 90.0, _seconds(0, 3600),
            "Seconds a cached registration outlives its Expires (FreeSWITCH's "
            "sip-expires-late-margin + registration-thread-frequency)."),
    Setting("guard", "scope", "all", _choice("all", "offnet", "patterns"),
            "Which credentialed calls are guarded: all; offnet (FusionPBX user_exists=false or "
            "call_direction=outbound); patterns (destinations matching scope_patterns)."),
    Setting("guard", "scope_patterns", [], _patterns,
            "With scope = patterns: regular expressions over the destination, e.g. \"^(00|011|\\\\+)\"."),
    Setting("guard", "allow_cidrs", [], _cidrs,
            "Client networks whose credentialed calls are allowed without a registration (sites that never register)."),
    Setting("guard", "identity_binding", False, _boolean,
            "Refuse a call whose From user is neither the authenticated user nor one of its aliases."),
    Setting("guard", "ua_binding", False, _boolean,
            "Refuse a call whose User-Agent differs from that of the registration it matched."),
    Setting("guard", "tls_only", False, _boolean,
            "Count only registrations made over TLS."),
    Setting("guard", "cross_family", False, _boolean,
            "Accept a call over IPv4 when the extension is registered only over IPv6, or the reverse "
            "(weakens the check for dual-stack devices: see README)."),
    Setting("guard", "trusted_proxies", [], _cidrs,
            "Proxies/SBCs whose proxy_header names the real client; the header from anyone else is refused."),
    Setting("guard", "proxy_header", "X-AUTH-IP", _header,
            "SIP header a trusted proxy sets to the client's address (channel variable sip_h_<name>)."),
    Setting("guard", "control_socket", "/run/fsguard/control.sock", _optional_text,
            "Unix socket (mode 0600) answering fsguard status and fsguard check."),
    Setting("guard", "metrics_listen", "127.0.0.1:9184", _optional_address,
            "Prometheus metrics (HTTP, /metrics); empty: off.  Keep it on localhost."),
    Setting("guard", "log_file", "", _optional_text,
            "Log file (reopened on SIGUSR1); empty: stderr (journald under systemd)."),
    Setting("guard", "log_level", "info", _choice("debug", "info", "warning", "error"),
            "Log level of the daemon (logs go to stderr)."),
    Setting("switch", "name", REQUIRED, _text, "Name of the FreeSWITCH node, unique."),
    Setting("switch", "esl", "127.0.0.1:8021", _address, "Inbound ESL address of the node."),
    Setting("switch", "password", "", _secret,
            "ESL password; or use password_env / password_file (exactly one of the three)."),
    Setting("switch", "password_env", "", _optional_text, "Name of an environment variable holding the ESL password."),
    Setting("switch", "password_file", "", _optional_text, "Path of a file holding the ESL password."),
    Setting("domain", "mode", INHERIT, _choice("enforce", "observe", "off"), "This domain's mode."),
    Setting("domain", "scope", INHERIT, _choice("all", "offnet", "patterns"), "This domain's scope."),
    Setting("domain", "scope_patterns", INHERIT, _patterns, "This domain's scope patterns."),
    Setting("domain", "allow_cidrs", INHERIT, _cidrs, "This domain's allowlist (added to the global one)."),
    Setting("domain", "identity_binding", INHERIT, _boolean, "Identity binding for this domain."),
    Setting("domain", "ua_binding", INHERIT, _boolean, "User-Agent binding for this domain."),
    Setting("domain", "tls_only", INHERIT, _boolean, "TLS-only registrations for this domain."),
    Setting("domain", "cross_family", INHERIT, _boolean, "Cross-family acceptance for this domain."),
    Setting("extension", "mode", INHERIT, _choice("enforce", "observe", "off"), "This extension's mode."),
    Setting("extension", "allow_cidrs", INHERIT, _cidrs, "This extension's allowlist."),
    Setting("audit", "url", "sqlite:////var/lib/fsguard/audit.db", _database_url,
            "Audit database: sqlite:///PATH (default) or postgresql+psycopg://USER@HOST/DB."),
    Setting("audit", "spool", "", _optional_text,
            "Local SQLite file keeping decisions the database cannot take yet, written later in order; "
            "empty: beside a SQLite audit database, else /var/lib/fsguard/audit.spool."),
    Setting("audit", "queue_size", 10_000, _count(100, 1_000_000),
            "Decisions held in memory on their way to the database; half full, they move to the spool."),
    Setting("audit", "batch_size", 100, _count(1, 10_000),
            "Most decisions written per insert; larger batches hold the event loop longer."),
    Setting("audit", "write_timeout", 5.0, _seconds(0, 300),
            "Seconds an insert may take; past it the database counts as failing and decisions go to the spool."),
    Setting("audit", "retry_interval", 5.0, _seconds(0, 300),
            "Longest wait, in seconds, between attempts to write to a failing database."),
)

_SECTIONS = {s.section for s in SETTINGS}
_LISTS = {"switch"}  # sections written as [[switch]] arrays
_NAMED = {"domain", "extension"}  # sections written as [domain."NAME"] tables


@dataclass(frozen=True)
class SwitchConfig:
    name: str
    host: str
    port: int
    password: str = field(repr=False)


@dataclass(frozen=True)
class AuditConfig:
    url: str
    spool: str = ""
    queue_size: int = 10_000
    batch_size: int = 100
    write_timeout: float = 5.0
    retry_interval: float = 5.0


@dataclass(frozen=True)
class Config:
    listen: tuple[str, int]
    policy: Policy
    decision_timeout: float
    command_timeout: float
    max_connections: int
    registrations: str
    expiry_margin: float
    proxy_header: str
    accept_from: tuple
    control_socket: str
    metrics_listen: tuple[str, int] | None
    log_file: str
    log_level: str
    switches: tuple[SwitchConfig, ...]
    audit: AuditConfig
    source: str = ""


def _section(raw: dict[str, Any], section: str, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    settings = {s.name: s for s in SETTINGS if s.section == section}
    unknown = sorted(set(raw) - set(settings))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown setting (known: {', '.join(settings)})")
    values = {}
    for name, setting in settings.items():
        if name not in raw:
            if setting.default is REQUIRED:
                raise ConfigError(f"{where}.{name}: required")
            if setting.default is not INHERIT:
                values[name] = setting.validate(setting.default)
            continue
        try:
            values[name] = setting.validate(raw[name])
        except ValueError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from None
    return values


def _password(values: dict[str, Any], where: str) -> str:
    given = [k for k in ("password", "password_env", "password_file") if values[k]]
    if len(given) != 1:
        raise ConfigError(f"{where}.password: set exactly one of password, password_env, password_file")
    if values["password_env"]:
        secret = os.environ.get(values["password_env"])
        if not secret:
            raise ConfigError(f"{where}.password_env: environment variable {values['password_env']} is not set")
        return secret
    if values["password_file"]:
        try:
            return Path(values["password_file"]).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.password_file: cannot read: {exc.strerror}") from None
    return values["password"]


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _switch_sources(switches: tuple[SwitchConfig, ...]) -> tuple:
    """Default accept_from: loopback, and each switch's address (resolved once, at load)."""
    networks = list(LOOPBACK)
    for index, switch in enumerate(switches):
        try:
            infos = socket.getaddrinfo(switch.host, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise ConfigError(f"switch[{index}].esl: cannot resolve {switch.host!r} ({exc}); "
                              f"set guard.accept_from explicitly") from None
        for info in infos:
            network = ipaddress.ip_network(info[4][0].split("%")[0])
            if not any(network.subnet_of(n) for n in networks if n.version == network.version):
                networks.append(network)
    return tuple(networks)


def _switches(raw: Any) -> tuple[SwitchConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("switch: configure at least one [[switch]]")
    switches = []
    for index, item in enumerate(raw):
        where = f"switch[{index}]"
        values = _section(item, "switch", where)
        host, port = values["esl"]
        switches.append(SwitchConfig(values["name"], host, port, _password(values, where)))
    names = [s.name for s in switches]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"switch.name: {duplicates[0]!r} is used twice")
    return tuple(switches)


RULE_KEYS = ("scope", "scope_patterns", "allow_cidrs", "identity_binding", "ua_binding", "tls_only", "cross_family")


def _rules(values: dict[str, Any], base: Rules) -> Rules:
    changes: dict[str, Any] = {k: values[k] for k in RULE_KEYS if k in values and k != "allow_cidrs"}
    if "mode" in values:
        changes["mode"] = Mode(values["mode"])
    if "scope" in changes:
        changes["scope"] = Scope(changes["scope"])
    if "allow_cidrs" in values:
        changes["allow_cidrs"] = values["allow_cidrs"]
    return replace(base, **changes)


def _named(raw: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    tables = raw.get(section, {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise ConfigError(f'{section}: write [{section}."NAME"] tables')
    return {name.lower(): _section(table, section, f'{section}."{name}"') for name, table in tables.items()}


def _policy(guard: dict[str, Any], raw: dict[str, Any]) -> Policy:
    default = _rules({**guard, "allow_cidrs": ()}, Rules())  # the global allowlist is global_allow_cidrs
    domains = {name: _rules(values, default) for name, values in _named(raw, "domain").items()}
    extensions = {}
    for name, values in _named(raw, "extension").items():
        if "@" not in name:
            raise ConfigError(f'extension."{name}": name it USER@DOMAIN')
        extensions[name] = ExtensionRules(
            allow_cidrs=values.get("allow_cidrs", ()),
            mode=Mode(values["mode"]) if "mode" in values else None,
        )
    for name, rules in [("guard", default), *domains.items()]:
        if rules.scope is Scope.PATTERNS and not rules.scope_patterns:
            where = "guard" if name == "guard" else f'domain."{name}"'
            raise ConfigError(f"{where}.scope_patterns: scope = \"patterns\" needs at least one pattern")
    return Policy(
        on_error=Action(guard["on_error"]),
        over_capacity=Action(guard["over_capacity"]),
        emergency_numbers=frozenset(guard["emergency_numbers"]),
        trusted_proxies=guard["trusted_proxies"],
        default=default,
        domains=domains,
        extensions=extensions,
        global_allow_cidrs=guard["allow_cidrs"],
    )


def parse(raw: dict[str, Any], source: str = "") -> Config:
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(_SECTIONS))})")
    for name in _SECTIONS - _LISTS - _NAMED:
        if isinstance(raw.get(name), list):
            raise ConfigError(f"{name}: write [{name}], not [[{name}]]")
    guard = _section(raw.get("guard", {}), "guard", "guard")
    audit = _section(raw.get("audit", {}), "audit", "audit")
    switches = _switches(raw.get("switch"))
    return Config(
        listen=guard["listen"],
        policy=_policy(guard, raw),
        decision_timeout=guard["decision_timeout"],
        command_timeout=guard["command_timeout"],
        max_connections=guard["max_connections"],
        registrations=guard["registrations"],
        expiry_margin=guard["expiry_margin"],
        proxy_header=guard["proxy_header"],
        accept_from=guard["accept_from"] or _switch_sources(switches),
        control_socket=guard["control_socket"],
        metrics_listen=guard["metrics_listen"],
        log_file=guard["log_file"],
        log_level=guard["log_level"],
        switches=switches,
        audit=AuditConfig(**audit),
        source=source,
    )


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; raise ConfigError on any problem."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML: {exc}") from None
    return parse(raw, os.fspath(path))
