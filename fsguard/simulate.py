"""``fsguard simulate``: the fraud scenario against a running daemon, no PBX needed.

Stands in for the configuration's first FreeSWITCH (inbound ESL, with the
captured byte formats), registers a phone, then plays FreeSWITCH's socket
application for four calls and prints what each caller would have got.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from .config import Config
from .daemon import EXIT_UNAVAILABLE
from .testing.caller import CallResult, CallScenario, place_call
from .testing.switch import FakeSwitch, Registration


@dataclass
class Step:
    title: str
    scenario: CallScenario


def _steps(user: str, domain: str, registered_ip: str, attacker_ip: str, destination: str, emergency: str):
    def call(source_ip: str, dial: str) -> CallScenario:
        return CallScenario(auth_user=user, realm=domain, source_ip=source_ip, destination=dial,
                            socket_mode="static")

    return [
        Step(f"{user}@{domain} from its registered IP {registered_ip} to {destination}", call(registered_ip, destination)),
        Step(f"{user}@{domain} (leaked password) from {attacker_ip} to {destination}", call(attacker_ip, destination)),
        Step(f"{user}@{domain} (leaked password) from {attacker_ip} to {emergency}", call(attacker_ip, emergency)),
        Step("trunk without credentials (ACL-trusted) to 9196", CallScenario(credentials=False, socket_mode="static")),
    ]


def _describe(result: CallResult) -> str:
    if result.refused:
        return "nothing listening"
    if result.outcome == "rejected":
        return f"{result.sip_final} (fsguard refused it)"
    if result.outcome == "continued":
        reason = result.variables.get("fsguard_reason", "?")
        if result.variables.get("fsguard_verdict") == "allow":
            return f"call proceeds (fsguard_verdict=allow, reason={reason})"
        return "603 Decline (no allow verdict: the dialplan check refuses)"
    return f"{result.outcome} {result.sip_final or ''}".strip()


def play(config: Config, identity: str, registered_ip: str, attacker_ip: str, destination: str) -> int:
    user, _, domain = identity.partition("@")
    if not user or not domain:
        raise click.BadParameter("expected USER@DOMAIN", param_hint="--user")
    switch = config.switches[0]
    fake = FakeSwitch(switch.host, switch.port, password=switch.password)
    try:
        fake.start()
    except OSError as exc:
        click.echo(
            f"fsguard simulate: cannot stand in for switch {switch.name!r} on {switch.host}:{switch.port}: "
            f"{exc.strerror or exc}. Is a real FreeSWITCH listening there? The simulation needs that address free.",
            err=True,
        )
        return EXIT_UNAVAILABLE
    try:
        fake.add(Registration(user, domain, network_ip=registered_ip, network_port=5060), event=True)
        click.echo(f"simulated switch {switch.name!r} on {switch.host}:{switch.port}: "
                   f"{identity} registered from {registered_ip}")
        numbers = config.policy.emergency_numbers
        emergency = "911" if "911" in numbers else sorted(numbers)[0]
        host, port = config.listen
        for number, step in enumerate(_steps(user, domain, registered_ip, attacker_ip, destination, emergency), 1):
            result = place_call((host, port), step.scenario, timeout=config.decision_timeout + 10)
            if result.refused:
                click.echo(f"fsguard simulate: nothing listens on {host}:{port}: start the daemon first "
                           f"(fsguard run --config ...)", err=True)
                return EXIT_UNAVAILABLE
            click.echo(f"call {number}: {step.title}\n        -> {_describe(result)}")
    finally:
        fake.stop()
    return 0
