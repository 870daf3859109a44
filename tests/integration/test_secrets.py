"""Secrets stay secret: ESL passwords never reach logs, status, errors; the control socket is 0600."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from fsguard.config import ConfigError, parse
from fsguard.format import render_status
from fsguard.testing.caller import CallScenario, place_call
from fsguard.testing.switch import FakeSwitch

SECRET = "S3cret-ESL-pa55"


def test_a_refused_password_is_never_logged_or_shown(tmp_path, start_daemon, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeSwitch(password="something-else") as switch:
        host, port = switch.address
        daemon = start_daemon(switch, wait_synced=False,
                              switches=[{"name": "fs1", "esl": f"{host}:{port}", "password": SECRET}])
        [watcher] = daemon.watchers
        assert watcher.wait_for(lambda w: "authentication refused" in w.last_error, 5)
        result = place_call(daemon.server.address, CallScenario(base="out-allow-registered-ip"))
        assert result.outcome == "rejected"  # on_error=deny: the lookup could not authenticate
        status = daemon.status()
        check = daemon.check({"identity": "1001@tenant-a.test", "source_ip": "127.0.0.10"})
    exposed = "\n".join([caplog.text, json.dumps(status, default=str), render_status(status), json.dumps(check),
                         repr(daemon.config)])
    assert "authentication refused" in caplog.text
    assert SECRET not in exposed


def test_a_timed_out_auth_does_not_echo_the_password(start_daemon, caplog):
    with FakeSwitch(password=SECRET, accept_but_silent=True) as switch:
        host, port = switch.address
        daemon = start_daemon(switch, registrations="live", command_timeout=0.3,
                              switches=[{"name": "fs1", "esl": f"{host}:{port}", "password": SECRET}])
        place_call(daemon.server.address, CallScenario(base="out-allow-registered-ip"))
    assert SECRET not in caplog.text


def test_config_errors_do_not_echo_the_password():
    with pytest.raises(ConfigError) as error:
        parse({"switch": [{"name": "a", "password": 735519}]})
    assert "735519" not in str(error.value)


def test_control_socket_is_0600(switch, start_daemon):
    daemon = start_daemon(switch)
    mode = stat.S_IMODE(os.stat(daemon.config.control_socket).st_mode)
    assert mode == 0o600
