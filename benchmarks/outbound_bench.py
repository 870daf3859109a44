"""Call-decision benchmark: a running ``fsguard run`` against simulated FreeSWITCH load.

    .venv/bin/python -m benchmarks.outbound_bench [--quick] [--json out.json] [--profile DIR]
    .venv/bin/python -m benchmarks.outbound_bench --soak 600 [--soak-rate 500]

``--quick`` is a ~30 s smoke run (short steps, sustainable rates); without it the
full run takes about 5 minutes.  ``--soak SECONDS`` runs only cache mode at
``--soak-rate`` calls/s for that long and prints fsguard's RSS at the start
(after warm-up), every minute and at the end: is its memory flat?  ``--json`` writes every figure: the input of
``benchmarks/compare.py``, the regression guard (``benchmarks/baseline-outbound.json``
is the stored baseline).  ``--profile DIR`` adds one profiled saturation
window per mode (py-spy: ``.venv/bin/pip install py-spy``): collapsed stacks
and a flame graph in DIR, the top costs per decision in the output; those
windows are not part of the figures.  ``--fsguard-tree DIR`` benchmarks the
fsguard package found in DIR instead of this working tree (a fixed commit
while others edit the tree: ``git archive <commit> fsguard | tar -x -C DIR``
and ``git rev-parse <commit> > DIR/COMMIT``); the generator replays this
tree's protocol, so DIR must speak it (commits before the ``api`` verdicts
do not).  ``--wait-idle SECONDS`` waits for other
processes to leave the CPUs alone first.  ``--help`` lists the other knobs.

Needs two CPUs: fsguard is pinned to CPU 0, everything else to CPU 1.

What runs
---------
* **fsguard** (CPU 0): ``fsguard run --config FILE`` as a subprocess (through
  ``fsguard.cli.main``), with ``guard.listen = "127.0.0.1:0"``,
  ``registrations = "cache"`` or ``"live"``, the audit URL a SQLite file in a
  temporary directory and ``log_level = "warning"``: the per-call
  ``decision`` lines of allowed calls (INFO) are not written; those of
  denied calls (WARNING) are, to a file.  Only the lifecycle logger
  ``fsguard.daemon`` is kept at INFO, for its ``listening on HOST:PORT``
  line, which gives the port.
* **FreeSWITCH's inbound side** (CPU 1, a process of its own, as FreeSWITCH
  is): a :class:`fsguard.testing.switch.FakeSwitch` on loopback (port 0)
  holding 10,000 registrations (4 tenants that reuse extension numbers, one
  device each).  Its ``sofia xmlstatus profile <p> user <u>@<d>`` answers
  come from an index by user@domain, as FreeSWITCH's come from an indexed
  SQL table (same bytes as the FakeSwitch's linear scan: checked at start),
  after the delay of that command in the capture ``in-api-registrations``
  (0.67 ms; ``--api-delay``; gevent's timers make it ~1.2 ms, the measured
  service time is reported, and live mode is also run once with no delay).
  During every step it streams ``sofia::register`` refreshes of the existing
  registrations at 500 events/s (``--event-rate``): the cache keeps its size.
* **FreeSWITCH's outbound side** (CPU 1, this process): a lean load generator
  replaying the bytes of the simulator :mod:`fsguard.testing.caller`.  At
  start the simulator itself (``place_call``) plays one allowed and one
  denied call per socket mode against a scripted app that sends exactly
  fsguard's commands; each answer (reply, events, notices) is recorded with
  placeholders for the call's uuid, user, realm and source IP, and replayed
  with every call's own values (same lengths, so Content-Length stays
  right).  The channel data (~7 KB) is checked byte for byte against
  ``fsguard.testing.caller.channel_data``, the events against a recording
  made with real values.  Timing as in the simulator: every command of
  fsguard is answered at once, in sync (``socket_mode="static"``, the
  shipped dialplan mode) and async mode alike: its ``api`` verdicts are run
  by FreeSWITCH's listener itself (only a ``sendmsg`` would wait for the
  parked session's next 20 ms frame).  The simulator
  itself costs ~4 ms of CPU per call (measured and printed): too slow to load
  fsguard at these rates, hence the replay.

Calls: 90% allowed (a registered extension from its registered IP), 10%
denied (a registered extension from an IP it has not registered:
``ip-not-registered``; in cache mode fsguard confirms such a deny with a live
lookup, by design).

Steps, per mode (a fresh daemon each; cache mode waits until a call is
answered from the cache, then a short warm-up; before every step the daemon
must be idle again, so that an overloaded step's backlog is not billed to
the next one):

* open loop at fixed offered rates (cache 100, 250, 500, 1,000, 2,000
  calls/s; live 100, 250, 500, 1,000): call starts are scheduled at fixed
  intervals and never wait for earlier calls (a closed loop would hide
  latency).  A step that does not keep up (achieved < 95% of offered, > 1%
  of calls lost, or p99 > 1 s) is marked OVERLOAD and the higher rates of
  that mode are skipped;
* saturation: a closed loop of 64 concurrent callers (``--concurrency``),
  each starting its next call when the previous one ends: the ceiling;
* live mode: the saturation again with a switch that answers at once;
* cache mode: one open-loop step in async mode: fsguard's api verdicts do
  not wait for the 20 ms frame (on a real switch the dialplan's continuation
  after ``exit`` does: the parked session notices on its next frame; not
  modelled here);
* cache mode: beyond capacity, an open loop at 1.5x the measured saturation
  rate: every call must still get a verdict (past ``max_connections`` the
  configured ``over_capacity`` one), none may be lost.  It lasts 3 s, or
  less where its backlog would pass 3/4 of the 4,000 calls the generator
  keeps in flight (as a switch's session limit would): a call the
  generator cannot start counts as lost.

Last, the generator's own ceiling: the same saturation step against a
minimal ESL app (``--null-app``: framing only, decides by source IP, also
subscribed to the switch's events) pinned to CPU 0 in fsguard's place.

Per step: decisions/s (verdicts effective inside the step's window),
offered vs achieved rate, decision latency = from the generator's TCP
connect (FreeSWITCH's side of the accept) to the verdict becoming effective
(the answer to ``api uuid_kill`` of a deny, to ``api uuid_setvar_multi ...
fsguard_verdict=allow`` of an allow): p50/p99/p99.9/max; fsguard's own
share of it (the time fsguard held the turn: from the connect and from each
of the generator's answers until fsguard's next bytes; what the simulated
switch takes is excluded, the generator's scheduling delay is not); each
call's verdict and reason as fsguard audited them (read back from the audit
database by the call's uuid: over-capacity verdicts are counted there); errors,
timeouts and wrong verdicts; the generator's lag behind its schedule; the
CPU of fsguard (percent of its core, milliseconds per decision), of the
generator and of the switch; busy CPU charged to no process (the kernel's
loopback TCP); CPU used by *other* processes (anything above ~0 means the
figures are not clean: flagged); events streamed; the switch's answer time.

Targets (issue): >= 2,000 decisions/s sustained in cache mode; cache
saturation >= 5x live saturation; at 500 calls/s fsguard's own time p99 <=
2 ms; beyond capacity no call without a verdict; memory flat (``--soak``).  Bounded: a fixed list of timed steps,
loopback only; every process started here is stopped on exit, on Ctrl-C or
on error (and gets SIGTERM if this process dies).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import gevent.event
import gevent.queue
import gevent.server
import gevent.socket as gsocket

from fsguard.audit import store
from fsguard.esl.outbound import verdict_command
from fsguard.esl.protocol import command
from fsguard.policy import Action
from fsguard.testing import transcripts as tr
from fsguard.testing.caller import CallScenario, channel_data, place_call, place_calls
from fsguard.testing.switch import FakeSwitch, Registration, xmlstatus

REPO = Path(__file__).resolve().parent.parent
perf = time.perf_counter

DAEMON_CPU = 0
GENERATOR_CPU = 1
PASSWORD = "ClueCon"
OWN_TIME_RATE = 500  # calls/s of the target on fsguard's own time (issue: p99 <= 2 ms at 500 calls/s)
# Reasons of verdicts fsguard gives when it cannot decide normally: past max_connections (over_capacity)
# and when the lookup does not answer within decision_timeout (on_error).  Both are configured verdicts.
OVERLOAD_REASONS = frozenset({"over-capacity", "timeout", "lookup-failed"})
BEYOND_CAPACITY = 1.5  # the beyond-capacity step offers this times the saturation rate
BEYOND_BACKLOG_SHARE = 0.75  # ... for at most as long as its backlog fills this share of the generator's cap
SOAK_SAMPLE = 60.0  # seconds per row of the soak run
CALL_TIMEOUT = 15.0  # the generator gives up on a call after this (fsguard's command_timeout is 5 s)

# Placeholders in the recorded bytes: same length as every real value.
P_UUID = "0bad0bad-beef-4bad-8bad-0bad0bad0bad"  # a uuid4 string is 36 characters
P_USER = "qzxjw"  # extensions are 5 digits
P_REALM = "vkpyhmrb.test"  # tenant-a.test ... (13 characters)
P_IP = "10.199.198.197"  # every source IP is written with 3-digit octets (14 characters)
PLACEHOLDERS = (P_UUID.encode(), P_USER.encode(), P_REALM.encode(), P_IP.encode())

# fsguard's commands, built as fsguard.esl.outbound builds them.
CONNECT = command("connect")
LINGER = command("linger")
SET_ALLOW = verdict_command(P_UUID, Action.ALLOW, "registered-ip")  # api uuid_setvar_multi
KILL = verdict_command(P_UUID, Action.DENY, "ip-not-registered")  # api uuid_kill
EXIT = command("exit")
ALLOW_PLAN = (CONNECT, LINGER, SET_ALLOW, EXIT)
DENY_PLAN = (CONNECT, LINGER, KILL, EXIT)

FULL = {"step_seconds": 20.0, "saturation_seconds": 20.0, "async_seconds": 10.0, "warmup_seconds": 3.0,
        "beyond_capacity_seconds": 3.0,  # or less: see BEYOND_BACKLOG_SHARE
        "cache_rates": (100, 250, 500, 1000, 2000), "live_rates": (100, 250, 500, 1000), "async_rate": 250,
        "instant_switch_seconds": 10.0, "ceiling_seconds": 10.0, "profile_seconds": 10.0, "simulator_calls": 300}
QUICK = {"step_seconds": 2.0, "saturation_seconds": 3.0, "async_seconds": 2.0, "warmup_seconds": 0.5,
         "beyond_capacity_seconds": 2.0,
         "cache_rates": (100, 500), "live_rates": (100,), "async_rate": 200,
         "instant_switch_seconds": 0.0, "ceiling_seconds": 2.0, "profile_seconds": 4.0, "simulator_calls": 100}


# --------------------------------------------------------------------------
# Machine facts and process helpers.


def tree_facts(tree: Path) -> dict:
    """Which fsguard the daemon runs: its directory, and its git commit when it is this repository."""
    facts = {"path": str(tree)}
    if tree.resolve() == REPO:
        try:
            facts["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "fsguard"],
                                   capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            facts["uncommitted_changes"] = bool(dirty)
        except (OSError, subprocess.SubprocessError):
            pass
    marker = tree / "COMMIT"
    if marker.exists():
        facts["git"] = marker.read_text().strip()
        facts["uncommitted_changes"] = False
    return facts


def machine_facts() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "kernel": platform.release(),
    }


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        pass


def _child_setup(cpu: int) -> None:
    """preexec_fn: pinned to ``cpu``, and SIGTERM when this benchmark dies."""
    _pin(cpu)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def process_cpu_seconds(pid: int, stat_path: str = "") -> float:
    """utime + stime of a process (from /proc/PID/stat)."""
    try:
        stat = Path(stat_path or f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main_thread_cpu_seconds(pid: int) -> float:
    """utime + stime of the process's main thread (the gevent hub: every call is decided there)."""
    return process_cpu_seconds(pid, f"/proc/{pid}/task/{pid}/stat")


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per CPU: (busy, total) jiffies from /proc/stat (busy = user+nice+system+irq+softirq+steal)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            v = [int(x) for x in values[:8]]
            out[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v))
    return out


def forks_since_boot() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def busy_pct(before: dict, after: dict) -> dict[int, float]:
    return {cpu: round((after[cpu][0] - before[cpu][0]) / max(after[cpu][1] - before[cpu][1], 1) * 100, 1)
            for cpu in before if cpu in after}


def process_sample(exclude: set[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds of every process but ours (and their children), with its command line."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        pid, ppid = int(entry.name), int(fields[1])
        if pid in exclude or ppid in exclude:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        out[pid] = (cmd or stat.partition("(")[2].partition(")")[0],
                    (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def foreign_usage(first: dict, second: dict, seconds: float) -> tuple[float, list[tuple[str, float]]]:
    """(total % of one core used by the sampled processes, top 5 commands)."""
    used = [(cmd, (cpu - first.get(pid, (cmd, 0.0))[1]) / seconds * 100) for pid, (cmd, cpu) in second.items()]
    used = sorted((u for u in used if u[1] > 0.5), key=lambda u: -u[1])
    return round(sum(u for _c, u in used), 1), [(c[:100], round(u, 1)) for c, u in used[:5]]


def other_processes(seconds: float = 1.0, exclude: set[int] | None = None) -> tuple[float, list[tuple[str, float]]]:
    """CPU used by processes other than ours over ``seconds``: (total % of one core, top commands)."""
    exclude = (exclude or set()) | {os.getpid()}
    first = process_sample(exclude)
    gevent.sleep(seconds)
    return foreign_usage(first, process_sample(exclude), seconds)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Child:
    """A subprocess logging to a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cpu: int, cwd: Path = REPO,
                 env: dict | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until stop()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=cwd, env=env, start_new_session=True,
                                        preexec_fn=lambda: _child_setup(cpu))  # noqa: PLW1509 - no threads here
        self.pid = self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            gevent.sleep(0.02)
        raise RuntimeError(f"{self.name}: no line matching {pattern!r} within {timeout:g}s:\n{self.log_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self, grace: float = 15.0) -> int | None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while self.process.poll() is None and time.monotonic() < deadline:
                gevent.sleep(0.05)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


# --------------------------------------------------------------------------
# The population: extensions, their registered IPs, attackers' IPs.


def _ip(first: int, n: int) -> str:
    # Three-digit octets: every address has the placeholder's length.
    return f"{first}.{100 + n // 10000 % 100}.{100 + n // 100 % 100}.{100 + n % 100}"


@dataclass(frozen=True)
class Population:
    size: int
    tenants: int

    def realm(self, i: int) -> str:
        return f"tenant-{'abcdefgh'[i % self.tenants]}.test"

    def user(self, i: int) -> str:
        return str(10000 + i // self.tenants)  # tenants reuse extension numbers

    def registered_ip(self, i: int) -> str:
        return _ip(10, i)

    @staticmethod
    def attacker_ip(k: int) -> str:
        return _ip(11, k)

    def registrations(self) -> list[Registration]:
        return [
            Registration(self.user(i), self.realm(i), network_ip=self.registered_ip(i), network_port=5060,
                         call_id=f"bench-{i}@{self.registered_ip(i)}", user_agent="Yealink SIP-T46S 66.86.0.15")
            for i in range(self.size)
        ]


class BenchSwitch(FakeSwitch):
    """FakeSwitch whose per-user xmlstatus answers come from an index.

    FreeSWITCH answers ``sofia xmlstatus profile <p> user <u>@<d>`` with an
    SQL query on an indexed table; the FakeSwitch scans every registration
    (0.5 ms of this process's CPU at 10,000), which would make the generator's
    core, not fsguard, the limit of live mode.  Same reply bytes (checked by
    ``check_index``); registrations must not be added or removed while it runs
    (the benchmark only re-announces existing ones).
    """

    def build_index(self) -> None:
        self.service_times = []
        self._index: dict[tuple[str, str, str], list[Registration]] = {}
        for reg in self._table.values():
            self._index.setdefault((reg.profile, reg.user, reg.realm), []).append(reg)

    def _xmlstatus(self, args: list[str]) -> str:
        if (len(args) == 4 and args[0].lower() == "profile" and args[1] in self.profiles
                and args[2].lower() == "user"):
            user, at, host = args[3].partition("@")
            if at and user and host:
                return xmlstatus(self._index.get((args[1], user, host), []), late_margin=self.late_margin)
        return super()._xmlstatus(args)

    service_times: list[float]

    def _api(self, conn, command: str) -> None:
        started = perf()
        super()._api(conn, command)  # includes the api_delay sleep and the send
        if " user " in command:
            self.service_times.append(perf() - started)

    def check_index(self, samples: list[str]) -> None:
        for aor in samples:
            args = ["profile", "internal", "user", aor]
            for _ in range(3):  # expsecs may tick between the two renderings
                if self._xmlstatus(args) == FakeSwitch._xmlstatus(self, args):
                    break
            else:
                raise RuntimeError(f"indexed xmlstatus differs from the FakeSwitch's for {aor}")


def captured_api_latency() -> float:
    """Seconds between ``api sofia xmlstatus profile ... user`` and its reply in the capture."""
    entries = tr.load("in-api-registrations").entries
    for n, entry in enumerate(entries):
        if entry.dir == tr.APP and b" user " in entry.data and entry.data.startswith(b"api sofia xmlstatus"):
            reply = next(e for e in entries[n + 1:] if e.dir == tr.FS)
            return round(reply.t - entry.t, 6)
    raise LookupError("in-api-registrations: no xmlstatus user lookup")


# --------------------------------------------------------------------------
# Recording the simulator's answers to fsguard's commands.


@dataclass
class Step:
    """What the simulated FreeSWITCH sends for one command of fsguard."""

    reply: bytes  # the command/reply (for connect: the channel data)
    after: bytes = b""  # events and notices that follow it
    verdict: str = ""  # "allow": effective when ``after`` is out; "deny": when the reply is
    closes: bool = False
    reply_subst: bool = False
    after_subst: bool = False

    def __post_init__(self) -> None:
        self.reply_subst = any(p in self.reply for p in PLACEHOLDERS)
        self.after_subst = any(p in self.after for p in PLACEHOLDERS)


Script = dict[bytes, Step]


def _until(cmd: bytes):
    """When the simulator has answered ``cmd`` completely."""
    if cmd.startswith(b"api uuid_kill "):
        return lambda m: m.content_type == "text/disconnect-notice" and m.headers.get("Content-Disposition") == "linger"
    if cmd == EXIT:
        return lambda m: False  # until the simulator closes
    return lambda m: True  # one message


def _scripted_app(sock: gsocket.socket, plan: tuple[bytes, ...], out: list) -> None:
    """Plays fsguard's side of one call, recording each command's answer."""
    reader = tr.RawReader()
    inbox: deque = deque()
    closed = False

    def read(timeout: float):
        nonlocal closed
        while not inbox and not closed:
            sock.settimeout(timeout)
            try:
                data = sock.recv(65536)
            except (TimeoutError, gsocket.timeout):
                return None
            if not data:
                closed = True
                break
            inbox.extend(reader.feed(data))
        return inbox.popleft() if inbox else None

    for cmd in plan:
        sock.sendall(cmd)
        done = _until(cmd)
        messages = []
        while True:
            item = read(5.0)
            if item is None:
                break
            messages.append(item)
            if done(item[0]):
                break
        if cmd.startswith(b"api uuid_kill "):  # anything after the linger notice
            while (item := read(0.05)) is not None:
                messages.append(item)
        out.append((cmd, messages))
    sock.close()


def record_call(scenario: CallScenario, plan: tuple[bytes, ...]) -> tuple[list, object]:
    """One simulated call (place_call) against a scripted app: (answers per command, CallResult)."""
    out: list = []
    finished = gevent.event.Event()

    def app(sock, _address) -> None:
        try:
            _scripted_app(sock, plan, out)
        finally:
            finished.set()

    server = gevent.server.StreamServer(("127.0.0.1", 0), app)
    server.start()
    try:
        result = place_call(server.address, scenario, timeout=10.0)
        finished.wait(10.0)
    finally:
        server.stop(timeout=1)
    sent = b"".join(result.sent)
    recorded = b"".join(raw for _cmd, messages in out for _m, raw in messages)
    if sent != recorded:
        raise RuntimeError("recording lost bytes the simulator sent")
    return out, result


def _first_line(cmd: bytes) -> str:
    return cmd.split(b"\n", 1)[0].decode("ascii", "replace")


def build_script(recordings: list[list]) -> Script:
    script: Script = {}
    for recording in recordings:
        for cmd, messages in recording:
            if not messages:
                raise RuntimeError(f"the simulator did not answer {_first_line(cmd)!r}")
            first = messages[0][0]
            if cmd != CONNECT and first.content_type not in ("command/reply", "api/response"):
                raise RuntimeError(f"unexpected first answer to {cmd!r}: {first.content_type}")
            step = Step(
                reply=messages[0][1],
                after=b"".join(raw for _m, raw in messages[1:]),
                verdict="allow" if cmd == SET_ALLOW else "deny" if cmd == KILL else "",
                closes=cmd == EXIT,
            )
            script.setdefault(cmd, step)
    return script


def substitute(data: bytes, values: tuple[bytes, bytes, bytes, bytes]) -> bytes:
    for placeholder, value in zip(PLACEHOLDERS, values):
        data = data.replace(placeholder, value)
    return data


_APP_UUID = re.compile(rb"(Application-UUID: )[0-9a-f-]{36}")


def _normalised(data: bytes) -> bytes:
    return _APP_UUID.sub(rb"\1-", data)  # random per execution in the simulator


def record_scripts(pop: Population) -> tuple[dict[str, Script], dict]:
    """Scripts for sync ("static") and async mode, and the checks made."""
    scripts: dict[str, Script] = {}
    checks: dict = {}
    for mode in ("static", "async"):
        base = {"uuid": P_UUID, "auth_user": P_USER, "realm": P_REALM, "source_ip": P_IP, "socket_mode": mode}
        jobs = [gevent.spawn(record_call, CallScenario(**base), plan) for plan in (ALLOW_PLAN, DENY_PLAN)]
        gevent.joinall(jobs, raise_error=True)
        (allow, allow_result), (deny, deny_result) = (j.value for j in jobs)
        if allow_result.outcome != "continued" or allow_result.verdict != "allow":
            raise RuntimeError(f"{mode}: recorded allow call ended {allow_result.outcome}")
        if deny_result.outcome != "rejected" or deny_result.sip_final != "603 Decline":
            raise RuntimeError(f"{mode}: recorded deny call ended {deny_result.outcome}")
        scripts[mode] = build_script([allow, deny])
    # The placeholders must not occur in the captures themselves.
    base_bytes = tr.load("out-allow-registered-ip").stream(tr.FS)
    assert not any(p in base_bytes for p in PLACEHOLDERS), "a placeholder occurs in the capture"
    # Channel data: byte for byte as the simulator renders it for real values.
    samples = [(3, pop.registered_ip(3)), (pop.size - 1, Population.attacker_ip(7))]
    for mode, script in scripts.items():
        for i, ip in samples:
            uuid = str(uuidlib.uuid4())
            values = (uuid.encode(), pop.user(i).encode(), pop.realm(i).encode(), ip.encode())
            real = channel_data(CallScenario(uuid=uuid, auth_user=pop.user(i), realm=pop.realm(i),
                                             source_ip=ip, socket_mode=mode))
            if substitute(script[CONNECT].reply, values) != real:
                raise RuntimeError(f"{mode}: replayed channel data differs from the simulator's")
    checks["channel_data_bytes"] = len(scripts["static"][CONNECT].reply)
    checks["channel_data_identical"] = True
    # Events: a recording with real values equals the replay (Application-UUID aside).
    i = 5
    uuid = str(uuidlib.uuid4())
    values = (uuid.encode(), pop.user(i).encode(), pop.realm(i).encode(), pop.registered_ip(i).encode())
    for plan in (ALLOW_PLAN, DENY_PLAN):
        plan = tuple(cmd.replace(PLACEHOLDERS[0], values[0]) for cmd in plan)  # api commands name the uuid
        real, _ = record_call(CallScenario(uuid=uuid, auth_user=pop.user(i), realm=pop.realm(i),
                                           source_ip=pop.registered_ip(i), socket_mode="static"), plan)
        for cmd, messages in real:
            step = scripts["static"][cmd.replace(values[0], PLACEHOLDERS[0])]
            if _normalised(b"".join(raw for _m, raw in messages)) != _normalised(
                    substitute(step.reply + step.after, values)):
                raise RuntimeError(f"replayed answer to {_first_line(cmd)!r} differs from the simulator's: "
                                   f"{b''.join(raw for _m, raw in messages)!r} vs {substitute(step.reply + step.after, values)!r}")
    checks["events_identical"] = True
    sizes = {mode: sum(len(s.reply) + len(s.after) for c, s in sc.items() if c != KILL) for mode, sc in scripts.items()}
    checks["bytes_to_fsguard_per_allowed_call"] = sizes["static"]
    checks["bytes_to_fsguard_per_denied_call"] = sum(
        len(s.reply) + len(s.after) for c, s in scripts["static"].items() if c != SET_ALLOW)
    return scripts, checks


# --------------------------------------------------------------------------
# The load generator.


class Rec:
    """One call: times (perf_counter), expected and seen verdict, error.

    ``own`` is the time fsguard held the turn before its verdict: from the
    TCP connect, and from every answer of the generator, until fsguard's next
    bytes arrived.  The generator's own work and its simulated delays (the
    async frame) are excluded; its scheduling delay is not (an overestimate).
    """

    __slots__ = ("error", "expect", "own", "reason", "sched", "seen", "t0", "t_conn", "t_done", "t_verdict", "uuid")

    def __init__(self, sched: float, expect: str) -> None:
        self.sched = sched
        self.expect = expect
        self.t0 = self.t_conn = self.t_verdict = self.t_done = self.own = 0.0
        self.seen = ""
        self.error = ""
        self.uuid = ""
        self.reason = ""  # from the audit database, after the step


SO_TIMESTAMPNS = getattr(gsocket, "SO_TIMESTAMPNS", 35)  # Linux
TIMESTAMP_SPACE = gsocket.CMSG_SPACE(16)  # struct timespec


def received_at(ancillary: list) -> float:
    """When the kernel received the bytes (SO_TIMESTAMPNS), not when this busy process got to read
    them: the generator's own scheduling delays stay out of fsguard's time.  Wall clock (the
    kernel's); time.time() if the timestamp is missing."""
    for level, kind, data in ancillary:
        if level == gsocket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds + nanoseconds / 1e9
    return time.time()


class CallTimeout(Exception):
    pass


class Generator:
    """Plays FreeSWITCH's outbound side for many concurrent calls."""

    def __init__(self, address: tuple[str, int], scripts: dict[str, Script], pop: Population,
                 deny_ratio: float, seed: int, max_inflight: int = 4000) -> None:
        self.address = address
        self.scripts = scripts
        self.pop = pop
        self.deny_ratio = deny_ratio
        self.rng = random.Random(seed)
        self.attackers = 0
        self.inflight = 0
        self.max_inflight = max_inflight
        self.not_started = 0

    def _spec(self) -> tuple[str, tuple[bytes, bytes, bytes, bytes]]:
        i = self.rng.randrange(self.pop.size)
        if self.rng.random() < self.deny_ratio:
            self.attackers += 1
            ip, expect = Population.attacker_ip(self.attackers % 1_000_000), "deny"
        else:
            ip, expect = self.pop.registered_ip(i), "allow"
        values = (str(uuidlib.uuid4()).encode(), self.pop.user(i).encode(), self.pop.realm(i).encode(), ip.encode())
        return expect, values

    def call(self, rec: Rec, values: tuple[bytes, bytes, bytes, bytes], mode: str) -> None:
        script = self.scripts[mode]
        sock = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        sock.setsockopt(gsocket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # see received_at
        self.inflight += 1
        rec.t0 = perf()
        try:
            with gevent.Timeout(CALL_TIMEOUT, CallTimeout):
                sock.connect(self.address)
                rec.t_conn, turn = perf(), time.time()
                buf = b""
                while True:
                    data, ancillary, _flags, _addr = sock.recvmsg(65536, TIMESTAMP_SPACE)
                    if not rec.seen:
                        rec.own += max(0.0, received_at(ancillary) - turn)
                    if not data:
                        if not rec.seen:
                            rec.error = "closed-before-verdict"
                        break
                    buf += data
                    done = False
                    while (end := buf.find(b"\n\n")) >= 0:
                        cmd, buf = buf[: end + 2].lstrip(b"\n"), buf[end + 2:]
                        if cmd == b"\n\n" or not cmd:
                            continue
                        step = script.get(cmd.replace(values[0], PLACEHOLDERS[0]))  # api commands name the uuid
                        if step is None:
                            rec.error = "unscripted:" + cmd.split(b"\n")[0].decode("ascii", "replace")[:40]
                            sock.sendall(b"Content-Type: command/reply\nReply-Text: -ERR command not found\n\n")
                            continue
                        reply = substitute(step.reply, values) if step.reply_subst else step.reply
                        after = substitute(step.after, values) if step.after_subst else step.after
                        sock.sendall(reply + after)
                        if step.verdict:
                            self._verdict(rec, step.verdict)
                        if step.closes:
                            done = True
                            break
                    if done:
                        break
                    turn = time.time()
        except CallTimeout:
            rec.error = "timeout"
        except ConnectionRefusedError:
            rec.error = "refused"
        except OSError as exc:
            rec.error = f"socket:{exc.__class__.__name__}"
        finally:
            rec.t_done = perf()
            self.inflight -= 1
            sock.close()
        if not rec.error and rec.seen != rec.expect:
            rec.error = f"verdict-{rec.seen or 'none'}-expected-{rec.expect}"

    @staticmethod
    def _verdict(rec: Rec, verdict: str) -> None:
        if not rec.seen:
            rec.t_verdict = perf()
            rec.seen = verdict

    def _start(self, recs: list, sched: float, mode: str) -> None:
        if self.inflight >= self.max_inflight:
            self.not_started += 1
            return
        expect, values = self._spec()
        rec = Rec(sched, expect)
        rec.uuid = values[0].decode()
        recs.append(rec)
        gevent.spawn(self.call, rec, values, mode)

    def open_loop(self, rate: float, seconds: float, mode: str) -> tuple[list[Rec], float, float]:
        """Call starts every 1/rate s, whatever the earlier calls are doing."""
        recs: list[Rec] = []
        count = int(rate * seconds)
        start = perf() + 0.01
        for k in range(count):
            due = start + k / rate
            delay = due - perf()
            if delay > 0:
                gevent.sleep(delay)
            self._start(recs, due, mode)
        end = start + seconds
        gevent.sleep(max(0.0, end - perf()))
        self.drain()
        return recs, start, end

    def closed_loop(self, concurrency: int, seconds: float, mode: str) -> tuple[list[Rec], float, float]:
        """``concurrency`` callers, each calling again as soon as its call ends."""
        recs: list[Rec] = []
        start = perf()
        end = start + seconds

        def caller() -> None:
            while perf() < end:
                expect, values = self._spec()
                rec = Rec(perf(), expect)
                rec.uuid = values[0].decode()
                recs.append(rec)
                self.call(rec, values, mode)

        gevent.joinall([gevent.spawn(caller) for _ in range(concurrency)])
        return recs, start, end

    def drain(self, timeout: float = CALL_TIMEOUT + 5) -> None:
        deadline = perf() + timeout
        while self.inflight and perf() < deadline:
            gevent.sleep(0.01)


class EventStream:
    """sofia::register refreshes of existing registrations at a fixed rate."""

    def __init__(self, switch: FakeSwitch, regs: list[Registration], rate: float) -> None:
        self.switch = switch
        self.regs = regs
        self.rate = rate
        self.sent = 0
        self._next = 0
        self._stop = gevent.event.Event()
        self._greenlet = None
        self.started = 0.0
        self.stopped = 0.0

    def start(self) -> EventStream:
        if self.rate > 0:
            self.started = perf()
            self._greenlet = gevent.spawn(self._run)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            target = int((perf() - self.started) * self.rate)
            while self.sent < target and not self._stop.is_set():
                self.switch.emit_register(self.regs[self._next % len(self.regs)], refresh=True)
                self._next += 1
                self.sent += 1
            self.switch.events_sent.clear()  # the FakeSwitch keeps every event sent otherwise
            self._stop.wait(0.01)

    def stop(self) -> float:
        """Stop; return the events/s achieved."""
        self.stopped = perf()
        self._stop.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout=5)
        self.switch.events_sent.clear()
        elapsed = self.stopped - self.started
        return round(self.sent / elapsed, 1) if self.rate > 0 and elapsed > 0 else 0.0


# --------------------------------------------------------------------------
# Statistics.


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _ms(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50) * 1000, 3),
        "p99": round(percentile(ordered, 99) * 1000, 3),
        "p99.9": round(percentile(ordered, 99.9) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3) if ordered else float("nan"),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3) if ordered else float("nan"),
    }


def summarize(recs: list[Rec], start: float, end: float) -> dict:
    ok = [r for r in recs if not r.error and r.t_verdict]
    errors = Counter(r.error.split(":")[0] if r.error.startswith("unscripted") else r.error
                     for r in recs if r.error)
    in_window = sum(1 for r in recs if r.t_verdict and start <= r.t_verdict <= end)
    finished = [r for r in recs if r.t_done]
    return {
        "calls": len(recs),
        "ok": len(ok),
        "allowed": sum(1 for r in ok if r.seen == "allow"),
        "denied": sum(1 for r in ok if r.seen == "deny"),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "timeouts": errors.get("timeout", 0),
        "wrong_verdicts": sum(n for e, n in errors.items() if e.startswith("verdict-")),
        "over_capacity": sum(1 for r in recs if r.reason == "over-capacity"),
        "overload_verdicts": sum(1 for r in recs if r.reason in OVERLOAD_REASONS),
        "without_verdict": sum(1 for r in recs if not r.seen),
        "decisions_per_s": round(in_window / (end - start), 1),
        "latency_ms": _ms([r.t_verdict - r.t0 for r in ok]),
        "fsguard_own_ms": _ms([r.own for r in ok]),
        # Allowed calls in cache mode never wait for the switch; denied ones do (live confirmation).
        "fsguard_own_allowed_ms": _ms([r.own for r in ok if r.seen == "allow"]),
        "fsguard_own_denied_ms": _ms([r.own for r in ok if r.seen == "deny"]),
        "latency_allowed_ms": _ms([r.t_verdict - r.t0 for r in ok if r.seen == "allow"]),
        "latency_denied_ms": _ms([r.t_verdict - r.t0 for r in ok if r.seen == "deny"]),
        "latency_from_schedule_ms": _ms([r.t_verdict - r.sched for r in ok]),
        "connect_ms": _ms([r.t_conn - r.t0 for r in ok]),
        "generator_lag_ms": _ms([r.t0 - r.sched for r in recs if r.t0]),
        "last_call_done_s": round(max((r.t_done for r in finished), default=end) - start, 3),
    }


# --------------------------------------------------------------------------
# The simulated switch, in a process of its own (FreeSWITCH is not inside the
# caller either): its api answers must not wait for the generator's event loop.


def switch_process_main(args: argparse.Namespace) -> None:
    """``--switch-process``: a BenchSwitch plus a JSON-lines control socket."""
    pop = Population(args.registrations, args.tenants)
    switch = BenchSwitch(api_delay=args.api_delay)
    regs = pop.registrations()
    for reg in regs:
        switch.add(reg)
    switch.build_index()
    switch.check_index([regs[0].aor, regs[-1].aor, "nobody@tenant-a.test"])
    switch.start()
    events: EventStream | None = None

    def control(sock, _peer) -> None:
        nonlocal events
        reader = sock.makefile("rb")
        for line in reader:
            request = json.loads(line)
            op = request["op"]
            reply: dict = {"ok": True}
            if op == "api_seen":
                reply["commands"] = sorted({c for c in switch.api_commands if " user " not in c})
                reply["user_lookups"] = sum(1 for c in switch.api_commands if " user " in c)
            elif op == "reset":
                switch.api_commands.clear()
                switch.service_times.clear()
                switch.events_sent.clear()
            elif op == "events_start":
                events = EventStream(switch, regs, request["rate"]).start()
            elif op == "events_stop":
                reply["events_per_s"] = events.stop() if events else 0.0
                reply["events"] = events.sent if events else 0
                events = None
            elif op == "stats":
                reply["user_lookups"] = len(switch.service_times)
                reply["service_ms"] = _ms(switch.service_times) if switch.service_times else None
                switch.api_commands.clear()  # bounded: the FakeSwitch keeps every command otherwise
            elif op == "set_api_delay":
                switch.api_delay = float(request["value"])
            elif op == "wait_subscribed":
                reply["ok"] = switch.wait_subscribed(request["count"], request["timeout"])
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            sock.sendall(json.dumps(reply).encode() + b"\n")

    server = gevent.server.StreamServer(("127.0.0.1", 0), control)
    server.start()
    print(f"switch ready esl={switch.port} control={server.address[1]} registrations={len(regs)}",
          file=sys.stderr, flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    switch.stop()


class SwitchControl:
    """The parent's handle on the switch process."""

    def __init__(self, workdir: Path, args: argparse.Namespace, api_delay: float) -> None:
        self.child = Child("switch", [sys.executable, "-m", "benchmarks.outbound_bench", "--switch-process",
                                      "--registrations", str(args.registrations), "--tenants", str(args.tenants),
                                      "--api-delay", repr(api_delay)], workdir / "switch.log", GENERATOR_CPU)
        match = self.child.wait_for_line(r"switch ready esl=(\d+) control=(\d+) registrations=(\d+)", timeout=120)
        self.port = int(match.group(1))
        self.address = ("127.0.0.1", self.port)
        self.registrations = int(match.group(3))
        self.pid = self.child.pid
        self.sock = gsocket.create_connection(("127.0.0.1", int(match.group(2))))
        self.reader = self.sock.makefile("rb")

    def request(self, op: str, **params) -> dict:
        self.sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
        line = self.reader.readline()
        if not line:
            raise RuntimeError(f"the switch process is gone:\n{self.child.log_text()[-2000:]}")
        return json.loads(line)

    def stop(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.child.stop(grace=5)


# --------------------------------------------------------------------------
# The daemon under test.

DAEMON_WRAPPER = (
    "import logging, sys\n"
    "import fsguard.cli\n"  # patches with gevent first, as `fsguard run` does
    "logging.getLogger('fsguard.daemon').setLevel(logging.INFO)  # its 'listening on' line only\n"
    "sys.argv[0] = 'fsguard'\n"
    "fsguard.cli.main()\n"
)


def supports(tree: Path, section: str, name: str) -> bool:
    """Does the fsguard in ``tree`` know this setting?  (Benchmarks older commits too.)"""
    try:
        text = (tree / "fsguard" / "config.py").read_text()
    except OSError:
        return False
    return f'Setting("{section}", "{name}"' in text


def write_config(workdir: Path, registrations: str, switch_address: tuple[str, int], tree: Path,
                 log_level: str = "warning", audit_url: str = "") -> Path:
    host, port = switch_address
    path = workdir / f"fsguard-{registrations}.toml"
    extra = ""
    # Settings of newer versions whose defaults are machine-wide (a fixed socket path and port): kept
    # on, but private to this run, so that the daemon neither clashes with another one nor changes.
    if supports(tree, "guard", "control_socket"):
        extra += f'control_socket = "{workdir}/control-{registrations}.sock"\n'
    if supports(tree, "guard", "metrics_listen"):
        extra += 'metrics_listen = "127.0.0.1:0"\n'
    path.write_text(
        "# written by benchmarks/outbound_bench.py\n"
        "[guard]\n"
        'listen = "127.0.0.1:0"\n'
        f'registrations = "{registrations}"\n'
        f'log_level = "{log_level}"\n'
        f"{extra}"
        "[[switch]]\n"
        'name = "fs1"\n'
        f'esl = "{host}:{port}"\n'
        f'password = "{PASSWORD}"\n'
        "[audit]\n"
        f'url = "{audit_url or f"sqlite:///{workdir}/audit-{registrations}.db"}"\n'
    )
    return path


def start_daemon(workdir: Path, config: Path, name: str, tree: Path) -> tuple[Child, tuple[str, int]]:
    # The fsguard package of ``tree`` (default: this repository) comes first on the path.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    daemon = Child(f"fsguard ({name})", [sys.executable, "-c", DAEMON_WRAPPER, "run", "--config", str(config)],
                   workdir / f"fsguard-{name}.log", DAEMON_CPU, cwd=tree, env=env)
    match = daemon.wait_for_line(r"listening on (\S+):(\d+)", timeout=30)
    return daemon, (match.group(1), int(match.group(2)))


def daemon_log_summary(daemon: Child) -> dict:
    lines = daemon.log_text().splitlines()
    return {
        "lines": len(lines),
        "deny_decision_lines": sum(1 for line in lines if " WARNING " in line and "decision uuid=" in line),
        "errors": sum(1 for line in lines if " ERROR " in line or line.startswith("Traceback")),
        "first_errors": [line[:300] for line in lines if " ERROR " in line or line.startswith("Traceback")][:5],
    }


def _audit_query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query on the audit database (SQLite file or PostgreSQL)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not Path(path).exists():
            raise FileNotFoundError(path)
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute(sql, params).fetchall()
    import sqlalchemy as sa  # PostgreSQL: only needed with --audit postgresql

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.exec_driver_sql(sql.replace("?", "%s"), params)]
    finally:
        engine.dispose()


def audit_rows(url: str) -> dict | None:
    try:
        return {"decision": _audit_query(url, "select count(*) from decision")[0][0]}
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a figure, reported as it is
        return {"error": str(exc)[:200]}


def audit_reasons(url: str, recs: list[Rec], timeout: float = 20.0) -> dict:
    """Each call's reason as fsguard audited it (joined on the call's uuid), and the counts.

    Waits for the rows: the audit writer lags the verdicts by up to ~50 ms,
    more after an overload.  Calls without a row are counted, not guessed.
    """
    wanted = {r.uuid: r for r in recs if r.uuid}
    found: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout
    while len(found) < sum(1 for r in recs if r.seen) and time.monotonic() < deadline:
        try:
            last = _audit_query(url, "select coalesce(max(id), 0) from decision")[0][0]
            rows = _audit_query(url, "select call_uuid, verdict, reason from decision where id > ? and id <= ?",
                                (audit_reasons.last_id.get(url, 0), last))
            audit_reasons.last_id[url] = last
        except Exception:  # noqa: BLE001 - not written yet (SQLite file) or busy: try again
            rows = []
        found.update((u, (v, r)) for u, v, r in rows if u in wanted)
        if len(found) < sum(1 for r in recs if r.seen):
            gevent.sleep(0.2)
    for uuid, (_verdict, reason) in found.items():
        wanted[uuid].reason = reason
    counts = Counter(f"{v}/{r}" for v, r in found.values())
    return {"by_reason": dict(counts.most_common()), "audited": len(found),
            "not_audited": sum(1 for r in recs if r.seen and r.uuid not in found)}


audit_reasons.last_id = {}  # per database: rows already read (steps run one after the other)


def pin_audit_backends(url: str) -> set[int]:
    """PostgreSQL: the server process writing fsguard's audit rows works on the generator's CPU, not on
    fsguard's (in production it is another process, often another machine)."""
    if url.startswith("sqlite"):
        return set()
    try:
        pids = _audit_query(url, "select pid from pg_stat_activity where application_name = 'fsguard'")
    except Exception:  # noqa: BLE001 - best effort; the 'frgn' column shows what was left
        return set()
    pinned = set()
    for (pid,) in pids:
        try:
            os.sched_setaffinity(pid, {GENERATOR_CPU})
            pinned.add(pid)
        except OSError:
            pass
    return pinned


def wait_cache_ready(switch: SwitchControl, address, pop: Population, timeout: float = 60.0) -> float:
    """Until a call of a registered extension is answered without a live lookup."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        seen = switch.request("api_seen")
        if all(f"sofia xmlstatus profile {p} reg" in seen["commands"] for p in ("internal", "internal-ipv6")):
            result = place_call(address, CallScenario(auth_user=pop.user(1), realm=pop.realm(1),
                                                      source_ip=pop.registered_ip(1), socket_mode="static"), 10.0)
            if result.verdict == "allow" and switch.request("api_seen")["user_lookups"] == seen["user_lookups"]:
                return round(time.monotonic() - started, 2)
        gevent.sleep(0.1)
    raise RuntimeError("the cache was not populated in time")


def simulator_checks(address, pop: Population) -> dict:
    """The real simulator's calls, each mode and verdict: outcome as expected?"""
    out = {}
    for mode in ("static", "async"):
        allow = place_call(address, CallScenario(auth_user=pop.user(2), realm=pop.realm(2),
                                                 source_ip=pop.registered_ip(2), socket_mode=mode), 10.0)
        deny = place_call(address, CallScenario(auth_user=pop.user(2), realm=pop.realm(2),
                                                source_ip=Population.attacker_ip(999_999), socket_mode=mode), 10.0)
        out[f"{mode}_allow"] = f"{allow.outcome}/{allow.verdict}"
        out[f"{mode}_deny"] = f"{deny.outcome}/{deny.sip_final}"
        if (allow.outcome, allow.verdict) != ("continued", "allow") or deny.sip_final != "603 Decline":
            raise RuntimeError(f"the simulator's calls did not end as expected: {out}")
    return out


def simulator_cost(address, pop: Population, calls: int) -> dict:
    """CPU per call of the full simulator (place_calls) in this process."""
    rng = random.Random(7)
    scenarios = []
    for k in range(calls):
        i = rng.randrange(pop.size)
        ip = pop.registered_ip(i) if k % 10 else Population.attacker_ip(k)
        scenarios.append(CallScenario(auth_user=pop.user(i), realm=pop.realm(i), source_ip=ip, socket_mode="static"))
    cpu0, t0 = own_cpu_seconds(), perf()
    results = place_calls(address, scenarios, concurrency=20, timeout=10.0)
    cpu, wall = own_cpu_seconds() - cpu0, perf() - t0
    return {
        "calls": calls,
        "ok": sum(1 for r in results if r.outcome in ("continued", "rejected")),
        "calls_per_s": round(calls / wall, 1),
        "cpu_ms_per_call": round(cpu / calls * 1000, 3),
        "ceiling_calls_per_s": round(calls / cpu, 1),
    }


# --------------------------------------------------------------------------
# Steps.


@dataclass
class Bench:
    args: argparse.Namespace
    cfg: dict
    pop: Population
    switch: SwitchControl
    scripts: dict[str, Script]
    workdir: Path
    api_delay: float
    children: list = field(default_factory=list)
    pg_databases: dict = field(default_factory=dict)  # mode -> URL, with --audit postgresql
    postgres: object = None  # tests.audit_conftest.Postgres, with --audit postgresql

    def generator(self, address) -> Generator:
        return Generator(address, self.scripts, self.pop, self.args.deny_ratio, self.args.seed)

    def settle(self, pid: int, window: float, limit: float = 90.0) -> float:
        """Wait until the process under test is idle: the previous step's backlog (an overloaded step
        leaves timed-out calls and a full audit queue behind) must not be billed to the next one."""
        started = perf()
        while perf() - started < limit:
            before = process_cpu_seconds(pid)
            gevent.sleep(window)
            if (process_cpu_seconds(pid) - before) / window < 0.05:
                break
        return round(perf() - started, 1)

    def run_step(self, gen: Generator, target_pid: int, name: str, kind: str, mode: str = "static",
                 rate: float = 0.0, concurrency: int = 0, seconds: float = 0.0) -> dict:
        backends: set[int] = set()
        if self.current_mode in ("cache", "live"):
            backends = pin_audit_backends(self.audit_url(self.current_mode))  # a new connection gets pinned too
        settled = self.settle(target_pid, 0.5 if self.args.quick else 1.0)
        self.switch.request("reset")
        self.switch.request("events_start", rate=self.args.event_rate)
        cpu_t0, gen_t0, wall_t0 = process_cpu_seconds(target_pid), own_cpu_seconds(), perf()
        main_t0 = main_thread_cpu_seconds(target_pid)
        sw_t0 = process_cpu_seconds(self.switch.pid)
        db_t0 = {pid: process_cpu_seconds(pid) for pid in backends}
        ours = {os.getpid(), target_pid, self.switch.pid} | backends  # PostgreSQL's: part of the set-up
        foreign0 = process_sample(ours)
        stat0, forks0 = cpu_times(), forks_since_boot()
        gen.not_started = 0
        if kind in ("open", "beyond"):
            recs, start, end = gen.open_loop(rate, seconds, mode)
        else:
            recs, start, end = gen.closed_loop(concurrency, seconds, mode)
        gen.drain()
        wall = perf() - wall_t0
        target_cpu = process_cpu_seconds(target_pid) - cpu_t0
        target_main_cpu = main_thread_cpu_seconds(target_pid) - main_t0
        gen_cpu = own_cpu_seconds() - gen_t0
        sw_cpu = process_cpu_seconds(self.switch.pid) - sw_t0
        db_cpu = sum(process_cpu_seconds(pid) - t for pid, t in db_t0.items())
        busy = busy_pct(stat0, cpu_times())
        forks = forks_since_boot() - forks0
        foreign, foreign_top = foreign_usage(foreign0, process_sample(ours), wall)
        events_per_s = self.switch.request("events_stop")["events_per_s"]
        switch_stats = self.switch.request("stats")
        # Busy CPU time none of the three processes was charged with: other processes, and the kernel's
        # own work (loopback TCP in softirq, ...).
        other = sum(busy.values()) - (target_cpu + gen_cpu + sw_cpu + db_cpu) / wall * 100
        result = {"name": name, "kind": kind, "socket_mode": mode, "offered_per_s": rate or None,
                  "concurrency": concurrency or None, "seconds": seconds, "settle_s": settled}
        if self.current_mode in ("cache", "live"):  # not for the null app
            result["audit"] = audit_reasons(self.audit_url(self.current_mode), recs)
            for rec in recs:  # verdicts of an overloaded fsguard (over_capacity, on_error) are verdicts, not wrong ones
                if rec.reason in OVERLOAD_REASONS and rec.error.startswith("verdict-"):
                    rec.error = ""
        result.update(summarize(recs, start, end))
        done = max(result["ok"] + result["error_count"], 1)
        result.update({
            "not_started": gen.not_started,
            "events_per_s": events_per_s,
            "live_lookups": switch_stats["user_lookups"],
            "switch_api_service_ms": switch_stats["service_ms"],
            "switch_cpu_pct": round(sw_cpu / wall * 100, 1),
            "audit_db_cpu_pct": round(db_cpu / wall * 100, 1),  # --audit postgresql: its backend, on CPU 1
            "target_cpu_pct": round(target_cpu / wall * 100, 1),
            "target_cpu_ms_per_call": round(target_cpu / done * 1000, 3),
            # The rest is fsguard's other threads: the SQLite audit writer's, gevent's resolver.
            "target_main_thread_cpu_ms_per_call": round(target_main_cpu / done * 1000, 3),
            "generator_cpu_pct": round(gen_cpu / wall * 100, 1),
            "generator_cpu_ms_per_call": round(gen_cpu / done * 1000, 3),
            "cpu_busy_pct": {str(cpu): pct for cpu, pct in busy.items()},
            "other_cpu_pct": round(other, 1),
            "foreign_processes_cpu_pct": foreign,
            "foreign_processes_top": foreign_top,
            "kernel_unattributed_cpu_pct": round(other - foreign, 1),
            "processes_started": forks,  # machine-wide; this benchmark starts none during a step
            "wall_s": round(wall, 3),
        })
        if kind in ("open", "beyond"):
            bad = result["error_count"] + gen.not_started
            result["overload"] = bool(result["decisions_per_s"] < 0.95 * rate or bad > 0.01 * max(len(recs), 1)
                                      or result["latency_ms"]["p99"] > 1000)
        else:
            result["overload"] = False
        print_row(self.current_mode, result)
        return result

    current_mode: str = ""

    def warmup(self, gen: Generator) -> None:
        recs, start, end = gen.open_loop(200, self.cfg["warmup_seconds"], "static")
        gen.drain()
        stats = summarize(recs, start, end)
        if stats["error_count"]:
            raise RuntimeError(f"warm-up calls failed: {stats['errors']}")

    def run_mode(self, registrations: str) -> dict:
        self.current_mode = registrations
        config = write_config(self.workdir, registrations, self.switch.address, Path(self.args.fsguard_tree),
                              self.args.log_level, self.audit_url(registrations))
        daemon, address = start_daemon(self.workdir, config, registrations, Path(self.args.fsguard_tree))
        self.children.append(daemon)
        out: dict = {"registrations": registrations, "steps": []}
        try:
            if registrations == "cache":
                out["cache_ready_after_s"] = wait_cache_ready(self.switch, address, self.pop)
            out["simulator_checks"] = simulator_checks(address, self.pop)
            if registrations == "cache" and not self.args.skip_simulator_cost:
                out["simulator_cost"] = simulator_cost(address, self.pop, self.cfg["simulator_calls"])
            gen = self.generator(address)
            self.warmup(gen)
            rates = self.cfg["cache_rates"] if registrations == "cache" else self.cfg["live_rates"]
            overloaded = False
            for rate in rates:
                if overloaded:
                    out["steps"].append({"name": f"open {rate}/s", "kind": "open", "skipped": "above capacity",
                                         "offered_per_s": rate})
                    print_skipped(registrations, f"open {rate}/s")
                    continue
                step = self.run_step(gen, daemon.pid, f"open {rate}/s", "open", rate=rate,
                                     seconds=self.cfg["step_seconds"])
                out["steps"].append(step)
                overloaded = step["overload"]
            saturation = self.run_step(gen, daemon.pid, "saturation", "closed", concurrency=self.args.concurrency,
                                       seconds=self.cfg["saturation_seconds"])
            out["steps"].append(saturation)
            if registrations == "cache":
                # Offered beyond what fsguard can decide: every call must still get a verdict (the
                # over-capacity one past max_connections), none may be dropped.
                rate = max(100, round(BEYOND_CAPACITY * saturation["decisions_per_s"] / 100) * 100)
                # The generator holds at most max_inflight calls, as a switch's session limit would:
                # the step's backlog (the excess over saturation x its length) must stay well within
                # it, or calls the generator could not start would count against fsguard.
                excess = max(1.0, rate - saturation["decisions_per_s"])
                seconds = min(self.cfg["beyond_capacity_seconds"], BEYOND_BACKLOG_SHARE * gen.max_inflight / excess)
                step = self.run_step(gen, daemon.pid, f"open {rate}/s (beyond capacity)", "beyond",
                                     rate=rate, seconds=round(seconds, 2))
                out["steps"].append(step)
            if registrations == "live" and self.cfg["instant_switch_seconds"]:
                # Is live mode bound by the switch's answer time or by fsguard's CPU?
                self.switch.request("set_api_delay", value=0.0)
                try:
                    out["steps"].append(self.run_step(gen, daemon.pid, "saturation, switch api 0 ms", "closed",
                                                      concurrency=self.args.concurrency,
                                                      seconds=self.cfg["instant_switch_seconds"]))
                finally:
                    self.switch.request("set_api_delay", value=self.api_delay)
            if registrations == "cache":
                rate = self.cfg["async_rate"]
                out["steps"].append(self.run_step(gen, daemon.pid, f"async {rate}/s", "open", mode="async",
                                                  rate=rate, seconds=self.cfg["async_seconds"]))
            if self.args.profile:
                out["profile"] = self.profile(gen, daemon.pid, registrations)
        finally:
            daemon.stop()
            self.children.remove(daemon)
        out["daemon_exit_code"] = daemon.process.returncode
        out["daemon_log"] = daemon_log_summary(daemon)
        out["audit_rows"] = audit_rows(self.audit_url(registrations))
        return out

    def audit_url(self, mode: str) -> str:
        """SQLite (the default) in the work directory, or a database of its own per mode on PostgreSQL."""
        if self.args.audit == "sqlite":
            return f"sqlite:///{self.workdir}/audit-{mode}.db"
        if mode not in self.pg_databases:
            if self.postgres is None:
                from tests.audit_conftest import ADMIN_URL, Postgres  # the tests' throw-away databases

                self.postgres = Postgres(ADMIN_URL)
            url = self.postgres.create_database("fsguard_bench_").render_as_string(hide_password=False)
            store.upgrade(url)
            self.pg_databases[mode] = url
        return self.pg_databases[mode]

    def run_soak(self, seconds: float, rate: float) -> dict:
        """Cache mode at ``rate`` calls/s for ``seconds``: does fsguard's memory stay flat?"""
        self.current_mode = "cache"
        config = write_config(self.workdir, "cache", self.switch.address, Path(self.args.fsguard_tree),
                              self.args.log_level, self.audit_url("cache"))
        daemon, address = start_daemon(self.workdir, config, "cache", Path(self.args.fsguard_tree))
        self.children.append(daemon)
        out: dict = {"rate": rate, "seconds": seconds, "steps": [], "rss_mb": []}
        try:
            out["cache_ready_after_s"] = wait_cache_ready(self.switch, address, self.pop)
            gen = self.generator(address)
            self.warmup(gen)
            out["rss_mb"].append({"at_s": 0.0, "rss": rss_mb(daemon.pid)})
            print(f"{'soak':<9} {'start':<28} fsguard RSS {out['rss_mb'][0]['rss']:.1f} MB", flush=True)
            started = perf()
            while perf() - started < seconds - 1:
                length = min(SOAK_SAMPLE, seconds - (perf() - started))
                step = self.run_step(gen, daemon.pid, f"{rate:g}/s, t={perf() - started:.0f} s", "open",
                                     rate=rate, seconds=length)
                step["rss_mb"] = rss_mb(daemon.pid)
                out["steps"].append(step)
                out["rss_mb"].append({"at_s": round(perf() - started, 1), "rss": step["rss_mb"]})
                print(f"{'':<9} {'':<28} fsguard RSS {step['rss_mb']:.1f} MB, own time p99 "
                      f"{step['fsguard_own_ms']['p99']:.2f} ms", flush=True)
        finally:
            daemon.stop()
            self.children.remove(daemon)
        out["daemon_exit_code"] = daemon.process.returncode
        out["daemon_log"] = daemon_log_summary(daemon)
        return out

    def profile(self, gen: Generator, pid: int, mode: str) -> dict:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            print("  (profile skipped: py-spy not installed; .venv/bin/pip install py-spy)")
            return {"skipped": "py-spy not installed"}
        outdir = Path(self.args.profile)
        outdir.mkdir(parents=True, exist_ok=True)
        seconds = self.cfg["profile_seconds"]
        raw, svg = outdir / f"{mode}-saturation.txt", outdir / f"{mode}-saturation.svg"
        result: dict = {}
        for fmt, path, length in (("raw", raw, seconds), ("flamegraph", svg, max(2.0, seconds / 2))):
            spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(int(length)),
                                    "--rate", "200", "--nonblocking", "--function", "--format", fmt, "-o", str(path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   preexec_fn=lambda: _child_setup(GENERATOR_CPU))  # noqa: PLW1509
            try:
                gevent.sleep(0.5)  # attached
                step = self.run_step(gen, pid, f"saturation (profiled, {fmt})", "closed",
                                     concurrency=self.args.concurrency, seconds=length)
                deadline = time.monotonic() + 30
                while spy.poll() is None and time.monotonic() < deadline:
                    gevent.sleep(0.1)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if fmt == "raw":
                result = summarize_profile(raw, step["target_cpu_ms_per_call"])
                result["decisions_per_s_while_profiled"] = step["decisions_per_s"]
        result.update({"raw": str(raw), "svg": str(svg)})
        print_profile(mode, result)
        return result

    def run_ceiling(self) -> dict:
        """The generator against a minimal app in fsguard's place."""
        self.current_mode = "null app"
        child = Child("null app", [sys.executable, "-m", "benchmarks.outbound_bench", "--null-app",
                                   "--switch-port", str(self.switch.port)], self.workdir / "null-app.log", DAEMON_CPU)
        self.children.append(child)
        try:
            match = child.wait_for_line(r"listening on (\S+):(\d+)", timeout=30)
            address = (match.group(1), int(match.group(2)))
            self.switch.request("wait_subscribed", count=1, timeout=10)
            gen = self.generator(address)
            self.warmup(gen)
            rate = max(self.cfg["cache_rates"])
            offered = self.run_step(gen, child.pid, f"open {rate}/s", "open", rate=rate,
                                    seconds=self.cfg["ceiling_seconds"])
            # The floor of "fsguard's own time": the same measurement of an app that does nothing.
            floor = offered if rate == OWN_TIME_RATE else self.run_step(
                gen, child.pid, f"open {OWN_TIME_RATE}/s", "open", rate=OWN_TIME_RATE, seconds=self.cfg["step_seconds"])
            ceiling = self.run_step(gen, child.pid, "saturation", "closed", concurrency=self.args.concurrency,
                                    seconds=self.cfg["ceiling_seconds"])
            return ceiling | {"open_loop": offered, "own_time_floor": floor}
        finally:
            child.stop()
            self.children.remove(child)


# --------------------------------------------------------------------------
# Profile summary (py-spy raw = collapsed stacks).

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{match.group('func')}"


def summarize_profile(raw: Path, cpu_ms_per_call: float, top: int = 15) -> dict:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def table(counter: Counter[str]) -> list[dict]:
        return [{"function": f, "pct": round(c / total * 100, 1), "us_per_call": round(c / total * cpu_ms_per_call * 1000)}
                for f, c in counter.most_common(top)]

    return {"samples": total, "cpu_ms_per_call": cpu_ms_per_call, "self": table(own), "inclusive": table(inclusive)}


# --------------------------------------------------------------------------
# The null app: the cheapest ESL outbound app, to measure the generator.


def null_app_main(switch_port: int) -> None:
    from fsguard.esl import watcher

    def reader(sock):
        buf = b""
        while True:
            end = buf.find(b"\n\n")
            if end >= 0:
                head = buf[:end]
                match = re.search(rb"(?m)^Content-Length: (\d+)$", head)
                length = int(match.group(1)) if match else 0
                if len(buf) >= end + 2 + length:
                    body, buf = buf[end + 2: end + 2 + length], buf[end + 2 + length:]
                    yield head, body
                    continue
            data = sock.recv(65536)
            if not data:
                return
            buf += data

    def handle(sock, _peer) -> None:
        messages = reader(sock)

        def until(pred) -> None:
            for head, body in messages:
                if pred(head, body):
                    return
            raise ConnectionError("closed")

        def reply(head, _body) -> bool:
            return b"Content-Type: command/reply" in head

        try:
            sock.sendall(CONNECT + LINGER)
            head, _ = next(messages)
            until(reply)
            uuid = re.search(rb"\nUnique-ID: (\S+)", head).group(1)
            deny = b"\nvariable_sip_network_ip: 11." in head
            sock.sendall((KILL if deny else SET_ALLOW).replace(PLACEHOLDERS[0], uuid) + EXIT)
            until(lambda h, _b: b"Content-Type: api/response" in h)
            until(reply)
        except (OSError, ConnectionError, StopIteration):
            pass
        finally:
            sock.close()

    def events() -> None:
        # Subscribed like fsguard's watcher, so the switch does the same work.
        sock = gsocket.create_connection(("127.0.0.1", switch_port))
        sock.sendall(f"auth {PASSWORD}\n\n".encode())
        sock.sendall(f"event json {watcher.SUBSCRIBED}\n\n".encode())
        while sock.recv(1 << 20):
            pass

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle, backlog=1024)
    server.start()
    gevent.spawn(events)
    print(f"listening on 127.0.0.1:{server.address[1]}", file=sys.stderr, flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()


# --------------------------------------------------------------------------
# Output.

HEADER = (f"{'mode':<9} {'step':<28} {'offered':>7} {'achieved':>8} {'calls':>6} {'err':>4} {'tmo':>4} "
          f"{'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'lag99':>6} {'tgtCPU':>6} {'ms/call':>7} "
          f"{'genCPU':>6} {'swCPU':>5} {'krnl':>5} {'frgn':>5} {'ev/s':>5} {'api99':>6}")


def _f(value, width: int, digits: int = 1) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float) and math.isnan(value):
        return f"{'nan':>{width}}"
    return f"{value:>{width}.{digits}f}" if isinstance(value, float) else f"{value:>{width}}"


def print_row(mode: str, s: dict) -> None:
    lat = s["latency_ms"]
    offered = s["offered_per_s"] if s["offered_per_s"] else f"c={s['concurrency']}"
    flag = "  OVERLOAD" if s.get("overload") else ""
    errs = s["error_count"] + s.get("not_started", 0)
    print(f"{mode:<9} {s['name']:<28} {offered:>7} {s['decisions_per_s']:>8.1f} {s['calls']:>6} {errs:>4} "
          f"{s['timeouts']:>4} {_f(lat['p50'], 7, 2)} {_f(lat['p99'], 7, 2)} {_f(lat['p99.9'], 7, 2)} "
          f"{_f(lat['max'], 7, 1)} {_f(s['generator_lag_ms']['p99'], 6, 2)} {s['target_cpu_pct']:>5.0f}% "
          f"{s['target_cpu_ms_per_call']:>7.3f} {s['generator_cpu_pct']:>5.0f}% {s['switch_cpu_pct']:>4.0f}% "
          f"{s['kernel_unattributed_cpu_pct']:>4.0f}% {s['foreign_processes_cpu_pct']:>4.0f}% "
          f"{s['events_per_s']:>5.0f} "
          f"{_f((s['switch_api_service_ms'] or {}).get('p99'), 6, 2)}{flag}",
          flush=True)
    if s["errors"]:
        print(f"{'':<9} {'':<28} errors: {s['errors']}", flush=True)
    if s.get("settle_s", 0) > 3:
        print(f"{'':<9} {'':<28} (the process under test needed {s['settle_s']:.0f} s to become idle before "
              f"this step)", flush=True)
    if contaminated(s):
        print(f"{'':<9} {'':<28} other processes: {s['foreign_processes_cpu_pct']:.0f}% of a CPU seen, "
              f"{s['processes_started']} started during the step; "
              f"{'; '.join(f'{u:.0f}% {c[:60]}' for c, u in s['foreign_processes_top'][:2])}", flush=True)


def print_skipped(mode: str, name: str) -> None:
    print(f"{mode:<9} {name:<28} skipped: a lower rate already overloaded", flush=True)


def print_profile(mode: str, p: dict) -> None:
    if "self" not in p:
        return
    print(f"\nprofile of fsguard ({mode} mode, saturation, {p['samples']} samples, "
          f"{p['cpu_ms_per_call']:.3f} ms CPU per decision; us/call = share x that):")
    print(f"  {'self %':>6} {'us/call':>7}  function (own time)")
    for row in p["self"]:
        print(f"  {row['pct']:>6.1f} {row['us_per_call']:>7}  {row['function']}")
    print(f"  {'incl %':>6} {'us/call':>7}  function (with callees)")
    for row in p["inclusive"]:
        print(f"  {row['pct']:>6.1f} {row['us_per_call']:>7}  {row['function']}")
    print(f"  collapsed stacks: {p.get('raw')}  flame graph: {p.get('svg')}\n", flush=True)


def contaminated(step: dict) -> bool:
    """Other processes used the CPUs: long-lived ones are seen ('frgn'); short-lived ones that came
    and went within the step are not, their CPU shows up as busy time charged to no process ('krnl'),
    which on a quiet machine stays within about +-20% (loopback TCP, tick granularity)."""
    return step.get("foreign_processes_cpu_pct", 0) > 10 or step.get("kernel_unattributed_cpu_pct", 0) > 20


def all_steps(result: dict) -> list[dict]:
    steps = [s for m in result["modes"].values() for s in m["steps"] if not s.get("skipped")]
    return steps + ([result["generator_ceiling"]] if result.get("generator_ceiling") else [])


def print_by_verdict(result: dict) -> None:
    print("\nlatency by verdict, ms (denied calls in cache mode wait for a live confirmation lookup):")
    print(f"{'mode':<9} {'step':<28} {'allowed p50':>11} {'p99':>8} {'max':>8}   {'denied p50':>10} {'p99':>8} "
          f"{'max':>8}  {'lookups':>7}")
    for mode, block in result["modes"].items():
        for st in block["steps"]:
            if st.get("skipped"):
                continue
            a, d = st["latency_allowed_ms"], st["latency_denied_ms"]
            print(f"{mode:<9} {st['name']:<28} {_f(a['p50'], 11, 2)} {_f(a['p99'], 8, 2)} {_f(a['max'], 8, 1)}   "
                  f"{_f(d['p50'], 10, 2)} {_f(d['p99'], 8, 2)} {_f(d['max'], 8, 1)}  {st['live_lookups']:>7}")


def print_own_time(result: dict) -> None:
    print("\nfsguard's own time per call (the generator's answers excluded) and the verdicts fsguard audited:")
    print(f"{'mode':<9} {'step':<28} {'own p50':>8} {'p99':>7} {'p99.9':>7}  {'allowed p99':>11} {'denied p99':>10}  "
          f"{'no verdict':>10}  verdicts (audit)")
    blocks = list(result["modes"].items())
    if result.get("generator_ceiling"):  # the null app: the floor of this measurement
        ceiling = result["generator_ceiling"]
        floor = ceiling.get("own_time_floor")
        blocks.append(("null app", {"steps": [s for s in (ceiling.get("open_loop"),
                                                          floor if floor is not ceiling.get("open_loop") else None,
                                                          ceiling) if s]}))
    for mode, block in blocks:
        for st in block["steps"]:
            if st.get("skipped") or "fsguard_own_ms" not in st:
                continue
            own = st["fsguard_own_ms"]
            reasons = ", ".join(f"{k} {v}" for k, v in st.get("audit", {}).get("by_reason", {}).items())
            print(f"{mode:<9} {st['name']:<28} {_f(own['p50'], 8, 2)} {_f(own['p99'], 7, 2)} "
                  f"{_f(own['p99.9'], 7, 2)}  {_f(st['fsguard_own_allowed_ms']['p99'], 11, 2)} "
                  f"{_f(st['fsguard_own_denied_ms']['p99'], 10, 2)}  {st['without_verdict']:>10}  {reasons or '-'}")


def print_soak(soak: dict) -> None:
    steps = soak["steps"]
    rss = [r["rss"] for r in soak["rss_mb"]]
    calls = sum(s["calls"] for s in steps)
    errors = sum(s["error_count"] + s.get("not_started", 0) for s in steps)
    without = sum(s["without_verdict"] for s in steps)
    own99 = max((s["fsguard_own_ms"]["p99"] for s in steps), default=float("nan"))
    print(f"\nsoak: {soak['rate']:g} calls/s for {soak['seconds']:.0f} s, cache mode: {calls:,} calls, "
          f"{errors} errors, {without} without a verdict; worst per-minute p99 of fsguard's own time {own99:.2f} ms")
    print(f"  fsguard RSS, MB: start {rss[0]:.1f}, end {rss[-1]:.1f}, max {max(rss):.1f} "
          f"(after warm-up; every minute: {', '.join(f'{r:.1f}' for r in rss)})")
    print(f"  fsguard: exit code {soak['daemon_exit_code']}, {soak['daemon_log']['errors']} error lines")


def print_summary(result: dict) -> None:
    s = result["summary"]
    print_by_verdict(result)
    print_own_time(result)
    print("\nsummary")
    if s["contaminated_steps"]:
        print(f"  WARNING: {s['contaminated_steps']} step(s) ran with other processes on the CPUs (column 'frgn' "
              f"> 10%, or 'krnl' > 20%: short-lived processes): do not use these figures as a baseline")
    print(f"  cache mode: saturation {s['cache_saturation_per_s']:,.0f} decisions/s; highest offered rate sustained "
          f"{s['cache_sustained_rate']} calls/s -> target >= 2,000/s: {'PASS' if s['target_cache_2000'] else 'FAIL'}")
    if s["live_saturation_per_s"]:
        print(f"  live mode:  saturation {s['live_saturation_per_s']:,.0f} decisions/s; highest offered rate sustained "
              f"{s['live_sustained_rate']} calls/s")
        print(f"  cache/live saturation ratio: {s['cache_live_ratio']:.2f}x -> target >= 5x: "
              f"{'PASS' if s['target_ratio_5x'] else 'FAIL'}")
    if s.get("own_p99_ms_at_500") is not None:
        floor = ""
        if "own_p99_ms_floor" in s:
            floor = (f", the same measurement of the null app {s['own_p99_ms_floor']:.2f} ms: fsguard adds "
                     f"{s['own_p99_ms_at_500_net']:.2f} ms")
        print(f"  at {OWN_TIME_RATE} calls/s (cache): fsguard's own time p99 {s['own_p99_ms_at_500']:.2f} ms for allowed "
              f"calls ({s['own_p99_ms_at_500_all_calls']:.2f} ms with the denied ones' live confirmation){floor} "
              f"-> target <= 2 ms: {'PASS' if s['target_own_p99_2ms'] else 'FAIL'}")
    beyond = s.get("beyond_capacity")
    if beyond:
        print(f"  beyond capacity ({beyond['offered_per_s']:,}/s offered, {beyond['calls']:,} calls): "
              f"{beyond['without_verdict']} without a verdict, {beyond['over_capacity']:,} over-capacity and "
              f"{beyond['overload_verdicts'] - beyond['over_capacity']:,} on_error (timeout) verdicts, "
              f"{beyond['errors']} other errors"
              + (f" ({beyond['not_started']} not started: the generator's cap)" if beyond.get("not_started") else "")
              + f" -> every call decided: {'PASS' if beyond['all_decided'] else 'FAIL'}")
    if s.get("generator_ceiling_per_s"):
        print(f"  generator ceiling (null app in fsguard's place): {s['generator_ceiling_per_s']:,.0f} calls/s "
              f"at {s['generator_ceiling_cpu_pct']:.0f}% of CPU {GENERATOR_CPU} (+{s['switch_cpu_pct_at_ceiling']:.0f}% "
              f"switch); offered {s['generator_open_rate']}/s on schedule: achieved {s['generator_open_achieved']:,.0f}"
              f"/s, lag p99 {s['generator_open_lag_p99_ms']:.2f} ms; "
              f"generator CPU during cache saturation: {s['generator_cpu_pct_at_cache_saturation']:.0f}%, "
              f"fsguard CPU: {s['fsguard_cpu_pct_at_cache_saturation']:.0f}%")
    sim = result["modes"]["cache"].get("simulator_cost")
    if sim:
        print(f"  simulator (place_calls, concurrency 20): {sim['cpu_ms_per_call']:.2f} ms CPU per call -> "
              f"at most ~{sim['ceiling_calls_per_s']:,.0f} calls/s on one core; lean replay: "
              f"{s['generator_ms_per_call_at_cache_saturation']:.3f} ms per call")


def summary(result: dict) -> dict:
    def step(mode: str, name: str) -> dict:
        return next((s for s in result["modes"].get(mode, {}).get("steps", []) if s["name"] == name), {})

    def sustained(mode: str) -> int:
        ok = [s["offered_per_s"] for s in result["modes"].get(mode, {}).get("steps", [])
              if s.get("kind") == "open" and s.get("socket_mode") == "static" and not s.get("skipped")
              and not s.get("overload")]
        return max(ok, default=0)

    cache_sat = step("cache", "saturation").get("decisions_per_s", 0.0)
    live_sat = step("live", "saturation").get("decisions_per_s", 0.0)
    ratio = cache_sat / live_sat if live_sat else float("nan")
    out = {
        "cache_saturation_per_s": cache_sat,
        "live_saturation_per_s": live_sat,
        "cache_live_ratio": round(ratio, 2),
        "cache_sustained_rate": sustained("cache"),
        "live_sustained_rate": sustained("live"),
        "target_cache_2000": cache_sat >= 2000 and sustained("cache") >= 2000,
        "target_ratio_5x": bool(ratio >= 5),
        "fsguard_cpu_pct_at_cache_saturation": step("cache", "saturation").get("target_cpu_pct"),
        "generator_cpu_pct_at_cache_saturation": step("cache", "saturation").get("generator_cpu_pct"),
        "generator_ms_per_call_at_cache_saturation": step("cache", "saturation").get("generator_cpu_ms_per_call"),
    }
    at500 = step("cache", f"open {OWN_TIME_RATE}/s")
    if at500:
        # Allowed calls: in cache mode nothing the simulator does is inside fsguard's turn (denied calls
        # include the switch's answer to their live confirmation lookup).
        out["own_p99_ms_at_500"] = at500["fsguard_own_allowed_ms"]["p99"]
        out["own_p99_ms_at_500_all_calls"] = at500["fsguard_own_ms"]["p99"]
        floor = (result.get("generator_ceiling") or {}).get("own_time_floor")
        if floor:
            # The null app's own time is what this measurement reads for an app that does nothing (the
            # generator's and the kernel's share): fsguard's contribution is what it adds to it.
            out["own_p99_ms_floor"] = floor["fsguard_own_allowed_ms"]["p99"]
            out["own_p99_ms_at_500_net"] = round(out["own_p99_ms_at_500"] - out["own_p99_ms_floor"], 3)
        out["target_own_p99_2ms"] = out.get("own_p99_ms_at_500_net", out["own_p99_ms_at_500"]) <= 2.0
    beyond = next((st for st in result["modes"].get("cache", {}).get("steps", []) if st.get("kind") == "beyond"), None)
    if beyond:
        errors = beyond["error_count"] + beyond.get("not_started", 0)
        out["beyond_capacity"] = {
            "offered_per_s": beyond["offered_per_s"], "calls": beyond["calls"],
            "without_verdict": beyond["without_verdict"], "over_capacity": beyond["over_capacity"],
            "overload_verdicts": beyond["overload_verdicts"],
            "errors": errors,
            "not_started": beyond.get("not_started", 0),
            "all_decided": beyond["without_verdict"] == 0 and errors == 0,
        }
    out["contaminated_steps"] = sum(1 for st in all_steps(result) if contaminated(st))
    ceiling = result.get("generator_ceiling")
    if ceiling:
        out["generator_ceiling_per_s"] = ceiling["decisions_per_s"]
        out["generator_ceiling_cpu_pct"] = ceiling["generator_cpu_pct"]
        out["switch_cpu_pct_at_ceiling"] = ceiling["switch_cpu_pct"]
        opened = ceiling.get("open_loop", {})
        out["generator_open_rate"] = opened.get("offered_per_s")
        out["generator_open_achieved"] = opened.get("decisions_per_s")
        out["generator_open_lag_p99_ms"] = opened.get("generator_lag_ms", {}).get("p99")
    return out


# --------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbound_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run (short steps, sustainable rates only)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (input of benchmarks/compare.py)")
    parser.add_argument("--profile", metavar="DIR", help="profile fsguard with py-spy in an extra saturation window")
    parser.add_argument("--registrations", type=int, default=10_000, help="registrations held by the switch")
    parser.add_argument("--tenants", type=int, default=4, choices=range(1, 9), metavar="1-8")
    parser.add_argument("--deny-ratio", type=float, default=0.10, help="share of calls from an unregistered IP")
    parser.add_argument("--event-rate", type=float, default=500.0, help="sofia::register events/s during steps")
    parser.add_argument("--concurrency", type=int, default=64, help="callers of the saturation (closed-loop) step")
    parser.add_argument("--cache-rates", help="comma-separated offered rates, cache mode")
    parser.add_argument("--live-rates", help="comma-separated offered rates, live mode")
    parser.add_argument("--step-seconds", type=float, help="length of each offered-rate step")
    parser.add_argument("--api-delay", type=float, default=None,
                        help="seconds the switch takes per api command (default: as captured, ~0.0007)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the generator-ceiling step")
    parser.add_argument("--skip-simulator-cost", action="store_true", help="skip timing the full simulator")
    parser.add_argument("--fsguard-tree", default=str(REPO), metavar="DIR",
                        help="run the daemon from the fsguard package in DIR (e.g. a `git archive` export of a "
                             "commit; a file DIR/COMMIT, if any, names the commit in the output); default: this "
                             "repository's working tree")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for other processes to use < 10%% of a CPU before starting")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="instead of the steps: cache mode at --soak-rate for SECONDS (e.g. 600), fsguard's "
                             "RSS at start, every minute and at the end")
    parser.add_argument("--soak-rate", type=float, default=500.0, help="calls/s of --soak")
    parser.add_argument("--modes", default="cache,live", help="comma-separated registration modes to run")
    parser.add_argument("--audit", choices=("sqlite", "postgresql"), default="sqlite",
                        help="fsguard's audit database: a SQLite file (the default setting) or a throw-away "
                             "PostgreSQL database (FSGUARD_TEST_POSTGRES, default the local test server), its "
                             "server process pinned to the generator's CPU")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="fsguard's log_level (info: a line per allowed call too)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--null-app", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--switch-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--switch-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.registrations < 10 or args.registrations > 990_000:
        parser.error("--registrations must be in [10, 990000]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.null_app:
        null_app_main(args.switch_port)
        return 0
    if args.switch_process:
        switch_process_main(args)
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    if args.cache_rates:
        cfg["cache_rates"] = tuple(int(r) for r in args.cache_rates.split(","))
    if args.live_rates:
        cfg["live_rates"] = tuple(int(r) for r in args.live_rates.split(","))
    if args.step_seconds:
        cfg["step_seconds"] = args.step_seconds
    def interrupt(signum, _frame) -> None:
        # Also when started with SIGINT ignored (a background job); the finally below stops the children.
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    cpus = os.sched_getaffinity(0)
    if not {DAEMON_CPU, GENERATOR_CPU} <= cpus:
        print(f"warning: CPUs {DAEMON_CPU} and {GENERATOR_CPU} are not both available ({sorted(cpus)}); "
              "figures are not comparable", file=sys.stderr)
    _pin(GENERATOR_CPU)
    raise_fd_limit()
    api_delay = captured_api_latency() if args.api_delay is None else args.api_delay

    machine = machine_facts()
    workdir = Path(tempfile.mkdtemp(prefix="fsguard-bench-"))
    pop = Population(args.registrations, args.tenants)
    started = time.time()
    bench = None
    switch: SwitchControl | None = None
    try:
        print(f"fsguard outbound benchmark ({'quick' if args.quick else 'full'} run)")
        tree = tree_facts(Path(args.fsguard_tree))
        print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, "
              f"gevent {machine['gevent']}, kernel {machine['kernel']}")
        print(f"fsguard under test: {tree['path']} (git {tree.get('git', '?')}"
              f"{', with uncommitted changes' if tree.get('uncommitted_changes') else ''})")
        other, top = other_processes(1.0)
        deadline = time.monotonic() + args.wait_idle
        while other >= 10 and time.monotonic() < deadline:
            print(f"waiting for the machine to be idle: other processes use {other:.0f}% of a CPU: {top[:2]}",
                  flush=True)
            gevent.sleep(10)
            other, top = other_processes(1.0)
        idle = {"other_processes_cpu_pct": other, "top": top}
        if other >= 10:
            print(f"WARNING: the machine is not idle: other processes use {other:.0f}% of a CPU "
                  f"({'; '.join(f'{u:.0f}% {c}' for c, u in top[:3])}); figures will be low and noisy")
        switch = SwitchControl(workdir, args, api_delay)
        scripts, checks = record_scripts(pop)
        print(f"setup: switch (own process, CPU {GENERATOR_CPU}) {switch.address[0]}:{switch.port} with "
              f"{switch.registrations:,} registrations "
              f"({args.tenants} tenants reusing extension numbers); its api answers take {api_delay * 1000:.2f} ms "
              f"(captured latency of 'sofia xmlstatus ... user'); sofia::register refreshes at "
              f"{args.event_rate:g}/s during every step")
        print(f"calls: {100 - args.deny_ratio * 100:.0f}% allowed (registered IP) / {args.deny_ratio * 100:.0f}% denied "
              f"(ip-not-registered); sync socket mode unless the step says async; "
              f"replayed simulator bytes: channel data {checks['channel_data_bytes']:,} B, "
              f"{checks['bytes_to_fsguard_per_allowed_call']:,} B to fsguard per allowed call, "
              f"{checks['bytes_to_fsguard_per_denied_call']:,} B per denied call "
              f"(identical to the simulator's: checked)")
        print(f"fsguard: `fsguard run` pinned to CPU {DAEMON_CPU}, log_level=warning (allowed calls' INFO decision "
              f"lines are not written; denied calls' WARNING lines go to a log file); generator and switch (two processes) on "
              f"CPU {GENERATOR_CPU}")
        print("latency = generator's TCP connect -> verdict effective (answer to api uuid_kill / uuid_setvar_multi); "
              "ms; lag99 = generator's p99 delay behind its schedule; tgtCPU, ms/call = "
              "CPU of the process under test; genCPU = this process (the generator); swCPU = the switch "
              "process; krnl = busy CPU charged to no process (loopback TCP softirq, ...); frgn = CPU used by "
              "other processes (must stay ~0); api99 = p99 service time of the "
              "switch's 'xmlstatus ... user' answers, ms\n")
        print(HEADER, flush=True)
        bench = Bench(args, cfg, pop, switch, scripts, workdir, api_delay)
        result: dict = {
            "schema": 1,
            "benchmark": "outbound",
            "run": "quick" if args.quick else "full",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine,
            "fsguard_tree": tree,
            "settings": {
                "registrations": args.registrations, "tenants": args.tenants, "deny_ratio": args.deny_ratio,
                "event_rate": args.event_rate, "concurrency": args.concurrency, "api_delay_s": api_delay,
                "log_level": args.log_level, "audit": args.audit, "daemon_cpu": DAEMON_CPU, "generator_cpu": GENERATOR_CPU,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            },
            "replay_checks": checks,
            "before_run": idle,
            "modes": {},
        }
        if args.soak:
            soak = result["soak"] = bench.run_soak(args.soak, args.soak_rate)
            result["elapsed_s"] = round(time.time() - started, 1)
            print_soak(soak)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
                print(f"  results: {args.json}")
            return 0
        for mode in args.modes.split(","):
            result["modes"][mode] = bench.run_mode(mode)
        if not args.no_ceiling:
            result["generator_ceiling"] = bench.run_ceiling()
        result["summary"] = summary(result)
        result["elapsed_s"] = round(time.time() - started, 1)
        print_summary(result)
        for mode in result["modes"]:
            log = result["modes"][mode]["daemon_log"]
            audit = result["modes"][mode]["audit_rows"]
            print(f"  fsguard {mode}: exit code {result['modes'][mode]['daemon_exit_code']}, {log['lines']:,} log lines "
                  f"({log['deny_decision_lines']:,} deny decisions, {log['errors']} errors); audit database: "
                  f"{audit if audit is not None else 'not written by this daemon'}")
            for line in log["first_errors"]:
                print(f"    {line}")
        print(f"  elapsed: {result['elapsed_s']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
            print(f"  results: {args.json}")
        return 0
    finally:
        if bench is not None:
            for child in list(bench.children):
                child.stop(grace=5)
            if bench.postgres is not None:
                bench.postgres.drop_all()
        if switch is not None:
            switch.stop()
        if args.keep:
            print(f"  kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
