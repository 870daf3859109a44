"""``fsguard run`` and ``fsguard simulate`` as real processes."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import gevent
import pytest

from fsguard.testing.caller import CallScenario, place_call
from fsguard.testing.switch import FakeSwitch, Registration


def write_config(path: Path, listen: str, switch_address, **guard) -> Path:
    host, port = switch_address
    guard.setdefault("metrics_listen", "")
    guard.setdefault("control_socket", f"{tempfile.mkdtemp(prefix='fsg-')}/control.sock")
    extra = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in guard.items())
    path.write_text(
        f'[guard]\nlisten = "{listen}"\ncommand_timeout = 2.0\n{extra}'
        f'[[switch]]\nname = "fs1"\nesl = "{host}:{port}"\npassword = "ClueCon"\n'
        f'[audit]\nurl = "sqlite:///{path.parent}/audit.db"\n'
    )
    return path


class Daemon:
    """A ``fsguard run`` process; its stderr is read line by line."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fsguard", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> re.Match:
        with gevent.Timeout(timeout, AssertionError(f"no line matching {pattern!r} in:\n" + "".join(self.lines))):
            while True:
                line = self.process.stderr.readline()
                if not line:
                    raise AssertionError(f"daemon exited; stderr:\n{''.join(self.lines)}")
                self.lines.append(line)
                match = re.search(pattern, line)
                if match:
                    return match

    def address(self) -> tuple[str, int]:
        match = self.wait_for_line(r"listening on (\S+):(\d+) .* metrics=(\S+)")
        self.address_seen = match.group(1), int(match.group(2))
        metrics = match.group(3)
        self.metrics_port = int(metrics.rsplit(":", 1)[1]) if metrics != "off" else None
        return self.address_seen

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.stderr.closed:
            return self.process.returncode
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.lines.append(self.process.stderr.read())  # what readline() left in the buffer, too
        self.process.stderr.close()
        return code


@pytest.fixture
def switch():
    with FakeSwitch() as fake:
        fake.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.10", network_port=5070))
        yield fake


def test_run_answers_a_call_end_to_end_and_stops_on_sigterm(switch, tmp_path):
    daemon = Daemon(write_config(tmp_path / "fsguard.toml", "127.0.0.1:0", switch.address))
    try:
        address = daemon.address()
        denied = place_call(address, CallScenario(base="out-deny-respond-603"), timeout=10)
        allowed = place_call(address, CallScenario(base="out-allow-registered-ip", socket_mode="static"), timeout=10)
        assert (denied.outcome, denied.sip_final) == ("rejected", "603 Decline")
        assert allowed.variables == {"fsguard_reason": "registered-ip", "fsguard_verdict": "allow"}
        daemon.wait_for_line(r"WARNING .*decision uuid=\S+ identity=1001@tenant-a.test source=127.0.0.20 .*"
                             r"verdict=deny reason=ip-not-registered")
    finally:
        code = daemon.stop()
    assert code == 0
    assert "stopped" in "".join(daemon.lines)


def test_listen_address_in_use_exits_69(switch, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(write_config(tmp_path / "fsguard.toml", f"127.0.0.1:{port}", switch.address))
        assert daemon.process.wait(timeout=20) == 69
        daemon.stop()
    assert "guard.listen" in "".join(daemon.lines)


def free_port() -> int:
    # simulate must stand in for the switch at the address the daemon's config names,
    # so that address needs a number before either process starts.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_simulate_against_a_running_daemon(tmp_path):
    config = write_config(tmp_path / "fsguard.toml", f"127.0.0.1:{free_port()}", ("127.0.0.1", free_port()))
    daemon = Daemon(config)
    try:
        daemon.address()
        result = subprocess.run([sys.executable, "-m", "fsguard", "simulate", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    calls = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("call ")]
    assert calls[0].endswith("call proceeds (fsguard_verdict=allow, reason=registered-ip)")
    assert calls[1].endswith("603 Decline (fsguard refused it)")
    assert calls[2].endswith("call proceeds (fsguard_verdict=allow, reason=emergency)")
    assert calls[3].endswith("call proceeds (fsguard_verdict=allow, reason=acl-trusted)")


def test_simulate_without_a_daemon_says_so(tmp_path):
    config = write_config(tmp_path / "fsguard.toml", f"127.0.0.1:{free_port()}", ("127.0.0.1", free_port()))
    result = subprocess.run([sys.executable, "-m", "fsguard", "simulate", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 69 and "start the daemon first" in result.stderr
