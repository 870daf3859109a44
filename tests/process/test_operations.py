"""Operations against a real ``fsguard run`` process: status, check, metrics, signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request

import gevent
import pytest

from fsguard.testing.caller import CallScenario, place_call, place_calls
from fsguard.testing.switch import FakeSwitch, Registration
from tests.process.test_run import Daemon, write_config


def fsguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsguard", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def switch():
    with FakeSwitch() as fake:
        fake.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.10", network_port=5070))
        yield fake


@pytest.fixture
def running(switch, tmp_path):
    config = write_config(tmp_path / "fsguard.toml", "127.0.0.1:0", switch.address, metrics_listen="127.0.0.1:0")
    daemon = Daemon(config)
    daemon.address()
    daemon.wait_for_line(r"switch=fs1 watcher live")
    yield daemon, config
    daemon.stop()


def test_status_reports_health_and_decisions(running):
    daemon, config = running
    address = daemon.address_seen
    place_call(address, CallScenario(base="out-deny-respond-603"))
    place_call(address, CallScenario(base="out-allow-registered-ip"))
    result = fsguard("status", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"fs1\s+live\s+1 registrations", result.stdout)
    assert "last minute allow 1, deny 1" in result.stdout
    assert "deny/ip-not-registered" in result.stdout and "health: ok" in result.stdout

    as_json = json.loads(fsguard("status", "--json", "--config", str(config)).stdout)
    assert as_json["decisions"]["last_hour"]["by_reason"] == {"allow/registered-ip": 1, "deny/ip-not-registered": 1}
    assert as_json["switches"][0]["state"] == "live" and as_json["audit"]["database"] == "ok"


def test_status_exit_codes(running, switch):
    daemon, config = running
    switch.stop()  # the watcher loses its switch
    daemon.wait_for_line(r"switch=fs1 watcher down")
    result = fsguard("status", "--config", str(config))
    assert result.returncode == 2 and "SWITCH DISCONNECTED" in result.stdout


def test_status_when_the_daemon_is_not_running(tmp_path):
    config = write_config(tmp_path / "fsguard.toml", "127.0.0.1:0", ("127.0.0.1", 1))
    result = fsguard("status", "--config", str(config))
    assert result.returncode == 3 and "is the daemon running?" in result.stderr


def test_check_explains_the_rule_without_auditing(running):
    daemon, config = running
    denied = fsguard("check", "1001@tenant-a.test", "127.0.0.20", "--destination", "00442030001234",
                     "--config", str(config))
    assert denied.returncode == 1
    assert denied.stdout.splitlines()[0] == "1001@tenant-a.test from 127.0.0.20 to 00442030001234: DENY (ip-not-registered)"
    assert "registered IPs: 127.0.0.10" in denied.stdout
    allowed = fsguard("check", "1001@tenant-a.test", "127.0.0.10", "--json", "--config", str(config))
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["rule"] == "registered-ip"
    emergency = fsguard("check", "1001@tenant-a.test", "203.0.113.1", "--destination", "911", "--config", str(config))
    assert emergency.returncode == 0 and "ALLOW (emergency)" in emergency.stdout
    status = json.loads(fsguard("status", "--json", "--config", str(config)).stdout)
    assert status["decisions"]["total"] == 0  # checks are not calls


def test_metrics_are_scraped(running):
    daemon, _ = running
    place_call(daemon.address_seen, CallScenario(base="out-deny-respond-603"))
    body = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    assert 'fsguard_decisions_total{reason="ip-not-registered",verdict="deny"} 1.0' in body
    assert 'fsguard_registrations{switch="fs1"} 1.0' in body
    assert 'fsguard_switch_up{switch="fs1"} 1.0' in body
    assert "fsguard_decision_seconds_bucket" in body and "fsguard_audit_queue_depth" in body


def test_sighup_reloads_a_good_config_and_keeps_the_old_on_a_bad_one(running):
    daemon, config = running
    address = daemon.address_seen
    text = config.read_text()
    config.write_text(text.replace("[guard]\n", '[guard]\nmode = "observe"\n'))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_line(r"configuration reloaded: mode=observe")
    observed = place_call(address, CallScenario(base="out-deny-respond-603"))
    assert observed.variables.get("fsguard_reason") == "observe"

    config.write_text(text.replace("[guard]\n", '[guard]\nmode = "enforc"\n'))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_line(r"reload refused, the running configuration stays: guard.mode")
    still_observed = place_call(address, CallScenario(base="out-deny-respond-603"))
    assert still_observed.variables.get("fsguard_reason") == "observe"
    assert daemon.process.poll() is None


def test_sigterm_lets_calls_in_flight_finish(running, switch):
    daemon, _ = running
    switch.api_delay = 1.0  # each verdict needs a slow live confirmation
    scenarios = [CallScenario(base="out-deny-respond-603") for _ in range(5)]
    calls = gevent.spawn(place_calls, daemon.address_seen, scenarios, 5, 10.0)
    assert switch.wait_until(lambda: len(switch.api_commands) >= 5, 5)  # all five are being decided
    code = daemon.stop()
    results = calls.get(timeout=15)
    assert code == 0
    assert [r.sip_final for r in results] == ["603 Decline"] * 5  # decided, not dropped


def test_systemd_ready_and_watchdog_pings_stop_when_the_daemon_hangs(switch, tmp_path, monkeypatch):
    import os
    import socket

    notify_path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2: a ping every 0.1 s
    daemon = Daemon(write_config(tmp_path / "fsguard.toml", "127.0.0.1:0", switch.address))
    try:
        messages = [receiver.recv(200).decode() for _ in range(3)]
        assert messages[0].startswith("READY=1") and messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        address = daemon.address()  # READY came once the port listened
        assert place_call(address, CallScenario(base="out-deny-respond-603")).sip_final == "603 Decline"
        os.kill(daemon.process.pid, signal.SIGSTOP)  # a hung daemon ...
        while True:  # drain what was sent before the stop
            receiver.settimeout(0.3)
            try:
                receiver.recv(200)
            except TimeoutError:
                break  # ... sends no ping for longer than WatchdogSec: systemd would restart it
        os.kill(daemon.process.pid, signal.SIGCONT)
        receiver.settimeout(5)
        assert receiver.recv(200) == b"WATCHDOG=1"
    finally:
        daemon.stop()
        receiver.close()


def test_sigusr1_reopens_the_log_file_after_rotation(switch, tmp_path):
    log_file = tmp_path / "fsguard.log"
    config = write_config(tmp_path / "fsguard.toml", "127.0.0.1:0", switch.address, log_file=str(log_file))
    daemon = Daemon(config)
    try:
        for _ in range(200):  # the daemon logs to the file, not stderr: wait for its first line
            if log_file.exists() and "listening on" in log_file.read_text():
                break
            gevent.sleep(0.05)
        port = int(re.search(r"listening on 127.0.0.1:(\d+)", log_file.read_text()).group(1))
        log_file.rename(tmp_path / "fsguard.log.1")  # logrotate moves it away
        daemon.process.send_signal(signal.SIGUSR1)
        for _ in range(200):
            if log_file.exists() and "log file reopened" in log_file.read_text():
                break
            gevent.sleep(0.05)
        place_call(("127.0.0.1", port), CallScenario(base="out-deny-respond-603"))
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
        assert "verdict=deny" in log_file.read_text()
        assert "verdict=deny" not in (tmp_path / "fsguard.log.1").read_text()
    finally:
        daemon.stop()
