"""Human-readable output of the daemon's JSON answers (status data in, text out)."""

from __future__ import annotations

from typing import Any

OK, AUDIT_FAILING, SWITCH_DOWN = 0, 1, 2


def health_code(status: dict[str, Any]) -> int:
    """0 healthy, 2 a switch is not live, 1 the audit is failing (switch first: calls depend on it)."""
    if status["registrations_source"] == "cache" and any(s["state"] != "live" for s in status["switches"]):
        return SWITCH_DOWN
    audit = status.get("audit") or {}
    if audit.get("database") == "failing" or audit.get("spool_rows"):
        return AUDIT_FAILING
    return OK


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join(parts + [f"{seconds}s"]) if not parts else " ".join(parts)


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _counts(window: dict[str, Any]) -> str:
    by_verdict = window["by_verdict"]
    return f"allow {by_verdict.get('allow', 0)}, deny {by_verdict.get('deny', 0)}"


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"fsguard {status['version']}, up {_duration(status['uptime'])}, mode {status['mode']}, "
        f"on_error {status['on_error']}, registrations from {status['registrations_source']}",
        f"listening on {status['listen']}, {status['calls_in_progress']} call(s) being decided",
        "switches:",
    ]
    for switch in status["switches"]:
        line = f"  {switch['name']:<12} {switch['state']:<12} {switch['registrations']:>7} registrations"
        if "last_event_age" in switch:
            line += f", last event {_ago(switch['last_event_age'])}"
        if switch.get("last_error") and switch["state"] != "live":
            line += f"\n  {'':<12} last error: {switch['last_error']}"
        lines.append(line)
    decisions = status["decisions"]
    latency = decisions["latency_ms"]
    lines += [
        f"decisions: last minute {_counts(decisions['last_minute'])}; last hour {_counts(decisions['last_hour'])}",
    ]
    for reason, count in sorted(decisions["last_hour"]["by_reason"].items(), key=lambda item: -item[1])[:8]:
        lines.append(f"  {reason:<32} {count:>8}  (last hour)")
    p50 = "-" if latency["p50"] is None else f"{latency['p50']} ms"
    p99 = "-" if latency["p99"] is None else f"{latency['p99']} ms"
    lines.append(f"decision time: p50 {p50}, p99 {p99}")
    audit = status.get("audit")
    if audit:
        lines.append(
            f"audit: database {audit.get('database', '?')}, queue {audit.get('queue_depth', 0)}, "
            f"spool {audit.get('spool_rows', 0)} rows, written {audit.get('written', 0)}"
            + (f", last error: {audit['last_error']}" if audit.get("last_error") else "")
        )
    code = health_code(status)
    lines.append({OK: "health: ok", AUDIT_FAILING: "health: AUDIT FAILING",
                  SWITCH_DOWN: "health: SWITCH DISCONNECTED"}[code])
    return "\n".join(lines)


def render_check(answer: dict[str, Any]) -> str:
    destination = f" to {answer['destination']}" if answer.get("destination") else ""
    head = f"{answer['identity']} from {answer['source_ip']}{destination}: {answer['verdict'].upper()} ({answer['reason']})"
    registered = ", ".join(answer["registered_ips"]) or "none"
    detail = (f"  rule: {answer['rule']}; mode: {answer['mode']}; registered IPs: {registered}; "
              f"lookup: {answer['lookup']} ({answer['latency_ms']} ms)")
    if answer.get("error"):
        detail += f"\n  error: {answer['error']}"
    return f"{head}\n{detail}"
