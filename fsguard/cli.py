"""The ``fsguard`` command line.

gevent patches the standard library before anything that opens sockets or
takes locks is imported (psycopg, SQLAlchemy, logging handlers): the
commands below import their modules lazily, after this module has patched.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402

CONFIG_OPTION = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    default="/etc/fsguard/fsguard.toml",
    show_default=True,
    help="TOML configuration file.",
)


@click.group()
@click.version_option(__version__, prog_name="fsguard")
def main() -> None:
    """fsguard: refuse authenticated SIP calls from IPs the extension has not registered."""


def _load(config_path: str):
    from .config import ConfigError, load
    from .daemon import EXIT_CONFIG

    try:
        return load(config_path)
    except ConfigError as exc:
        click.echo(f"fsguard: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.command()
@CONFIG_OPTION
def run(config_path: str) -> None:
    """Run the daemon in the foreground (logs go to stderr)."""
    from .daemon import run as run_daemon

    sys.exit(run_daemon(_load(config_path)))


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_path: str) -> None:
    """Validate a configuration file and exit (0: valid)."""
    config = _load(config_path)
    click.echo(f"{config_path}: ok ({len(config.switches)} switch(es), mode={config.policy.mode})")


@main.command()
@CONFIG_OPTION
@click.option("--user", default="1001@tenant-a.test", show_default=True, help="Extension (user@domain) to play.")
@click.option("--registered-ip", default="127.0.0.10", show_default=True, help="IP the device registers from.")
@click.option("--attacker-ip", default="127.0.0.20", show_default=True, help="IP the leaked credentials call from.")
@click.option("--destination", default="00442030001234", show_default=True, help="Number the calls dial.")
def simulate(config_path: str, user: str, registered_ip: str, attacker_ip: str, destination: str) -> None:
    """Play a fraud scenario against a running daemon, without a PBX.

    Stands in for the FreeSWITCH of the config's first [[switch]] (so that
    address must be free), registers USER from REGISTERED_IP, then places
    calls with USER's credentials from both IPs, to an emergency number and
    from a trunk, and prints what each caller got.
    """
    from .simulate import play

    sys.exit(play(_load(config_path), user, registered_ip, attacker_ip, destination))


# Exit codes of ``fsguard status`` (monitoring plugins' convention).
STATUS_OK, STATUS_AUDIT_FAILING, STATUS_SWITCH_DOWN, STATUS_UNREACHABLE = 0, 1, 2, 3


def _control(config_path: str, payload: dict) -> dict:
    from .control import ControlError, request

    config = _load(config_path)
    try:
        reply = request(config.control_socket, payload)
    except ControlError as exc:
        click.echo(f"fsguard: {exc} (is the daemon running?)", err=True)
        sys.exit(STATUS_UNREACHABLE)
    if not reply.get("ok"):
        click.echo(f"fsguard: {reply.get('error', 'request failed')}", err=True)
        sys.exit(STATUS_UNREACHABLE)
    return reply


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
def status(config_path: str, as_json: bool) -> None:
    """Show the running daemon's health.

    Exit codes: 0 healthy; 1 the audit is failing (database down, decisions
    spooled); 2 a switch is disconnected (its calls are decided by live
    lookups, or by on_error); 3 the daemon cannot be reached.
    """
    import json

    from .format import health_code, render_status

    data = _control(config_path, {"command": "status"})["status"]
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else render_status(data))
    sys.exit(health_code(data))


@main.command()
@CONFIG_OPTION
@click.argument("identity", metavar="USER@DOMAIN")
@click.argument("source_ip", metavar="SOURCE_IP")
@click.option("--destination", default="", help="Dialled number (scopes, emergency numbers).")
@click.option("--user-agent", default="", help="Caller's User-Agent (UA binding).")
@click.option("--from-user", default="", help="From user, when it differs from USER (identity binding).")
@click.option("--offnet", is_flag=True, help="Treat the call as leaving the PBX (user_exists=false).")
@click.option("--profile", default="internal", show_default=True, help="Sofia profile of the call.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def check(config_path, identity, source_ip, destination, user_agent, from_user, offnet, profile, as_json) -> None:
    """Ask the running daemon what it would decide now, and why.

    No call is made and nothing is audited.  Exit code 0: allowed, 1: refused,
    3: the daemon cannot be reached.
    """
    import json

    from .format import render_check

    payload = {"command": "check", "identity": identity, "source_ip": source_ip, "destination": destination,
               "user_agent": user_agent, "from_user": from_user, "profile": profile,
               "user_exists": "false" if offnet else ""}
    answer = _control(config_path, payload)
    answer.pop("ok", None)
    click.echo(json.dumps(answer, indent=2, sort_keys=True) if as_json else render_check(answer))
    sys.exit(0 if answer["verdict"] == "allow" else 1)


# The audit trail's groups; they import SQLAlchemy only when a command runs.
from .audit.cli import audit, db  # noqa: E402

main.add_command(db)
main.add_command(audit)


# The FusionPBX installer; it imports SQLAlchemy only when a command runs.
from .fusionpbx_cli import fusionpbx  # noqa: E402

main.add_command(fusionpbx)


if __name__ == "__main__":
    main()
