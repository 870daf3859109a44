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


if __name__ == "__main__":
    main()
