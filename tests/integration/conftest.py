"""Fixtures: the daemon's real parts, in process, against the FreeSWITCH simulator."""

from __future__ import annotations

import tempfile

import pytest

from fsguard.config import parse
from fsguard.daemon import Daemon
from fsguard.testing.switch import FakeSwitch, Registration

# The registrations of the captures (in-api-registrations).
CAPTURED_REGISTRATIONS = (
    Registration("1001", "tenant-a.test", network_ip="127.0.0.10", network_port=5070,
                 call_id="api-1001-tenant-a@127.0.0.10", user_agent='Yealink SIP-T46S 66.86.0.15 "quoted" & <x>'),
    Registration("1001", "tenant-b.test", network_ip="127.0.0.11", network_port=5071,
                 call_id="api-1001-tenant-b@127.0.0.11", user_agent="Grandstream GXP2170 1.0.11.23"),
    Registration("1002", "tenant-a.test", network_ip="127.0.0.12", network_port=5072,
                 call_id="api-1002-tenant-a-dev1@127.0.0.12", user_agent="Yealink SIP-T54W 96.86.0.100"),
    Registration("1002", "tenant-a.test", network_ip="127.0.0.13", network_port=5073,
                 call_id="api-1002-tenant-a-dev2@127.0.0.13", user_agent="PolycomVVX-VVX_450-UA/6.4.3.5018"),
    Registration("1003", "tenant-a.test", network_ip="::1", network_port=5077, profile="internal-ipv6",
                 call_id="api-1003-tenant-a-v6@[::1]", user_agent="Linphone/5.2.5 (belle-sip/5.2.5)"),
)


@pytest.fixture
def switch():
    fake = FakeSwitch()
    fake.start()
    for registration in CAPTURED_REGISTRATIONS:
        fake.add(registration)
    yield fake
    fake.stop()


def short_dir() -> str:
    # A Unix socket path must fit in 108 bytes: pytest's tmp_path may not.
    return tempfile.mkdtemp(prefix="fsg-")


def guard_config(switch_address, tmp_path, switches=None, domain=None, extension=None, **guard):
    host, port = switch_address
    settings = {"listen": "127.0.0.1:0", "command_timeout": 2.0, "metrics_listen": "",
                "control_socket": f"{short_dir()}/control.sock", **guard}
    return parse({
        "guard": settings,
        "domain": domain or {},
        "extension": extension or {},
        "switch": switches or [{"name": "fs1", "esl": f"{host}:{port}", "password": "ClueCon"}],
        "audit": {"url": f"sqlite:///{tmp_path}/audit.db"},
    })


@pytest.fixture
def start_daemon(tmp_path):
    """start_daemon(switch, **guard settings) -> a started in-process Daemon."""
    daemons = []

    def start(switch, switches=None, wait_synced=True, **guard):
        daemon = Daemon(guard_config(switch.address, tmp_path, switches=switches, **guard))
        daemon.start()
        daemons.append(daemon)
        for watcher in daemon.watchers if wait_synced else ():
            assert watcher.synced.wait(5), f"watcher {watcher.name} never synced: {watcher.last_error}"
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop(grace=1.0)
