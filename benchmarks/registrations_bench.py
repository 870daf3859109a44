"""Registration cache benchmark (issue "Registration watcher").

    .venv/bin/python -m benchmarks.registrations_bench [--json FILE]

Measures, in process, from the captured byte formats:

* events applied per second: ESL bytes of ``sofia::register`` (JSON, as the
  watcher subscribes) -> framing -> event -> cache, the watcher's whole path
  minus the socket;
* bootstrap of 100,000 registrations from one ``sofia xmlstatus profile <p>
  reg`` reply (generated in the captured format): time and peak RSS, in a
  fresh interpreter so that the figure is the bootstrap's own; measured twice,
  parsing the reply alone, and end to end through the real watcher (inbound
  ESL on loopback: connect, auth, subscribe, profile list, the 75 MB reply,
  parse, swap);
* verdict lookup with 100,000 bindings cached: cache lookup + verdict.

Targets: >= 10,000 events/s, 100k bootstrap < 5 s and < 200 MB RSS, lookup
< 20 us.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fsguard.call import CallFacts
from fsguard.esl.protocol import MessageReader
from fsguard.policy import Policy, decide
from fsguard.registrations import (
    RegistrationCache,
    Registrations,
    SwitchTable,
    change_from_event,
    parse_xmlstatus,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fsguard" / "testing" / "fixtures" / "freeswitch"
N = 100_000


def captured(name: str) -> list:
    reader, messages = MessageReader(max_body=1 << 26), []
    with open(FIXTURES / f"{name}.jsonl") as handle:
        handle.readline()
        for line in handle:
            entry = json.loads(line)
            if entry["dir"] == "fs>app":
                messages += reader.feed(entry["data"].encode())
    return messages


def register_event_template() -> dict:
    for message in captured("in-events-json"):
        event = message.event()
        if event is not None and event.subclass == "sofia::register":
            return json.loads(message.body)
    raise SystemExit("no sofia::register in in-events-json")


def event_stream(count: int) -> bytes:
    template = register_event_template()
    chunks = []
    for i in range(count):
        body = dict(template)
        body["call-id"] = f"bench-{i}@10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        body["from-user"] = body["username"] = str(1000 + i % 5000)
        body["network-ip"] = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        data = json.dumps(body, separators=(",", ":")).encode()
        chunks.append(b"Content-Length: %d\nContent-Type: text/event-json\n\n%s" % (len(data), data))
    return b"".join(chunks)


def xmlstatus_row_template() -> str:
    for message in captured("in-api-registrations"):
        text = message.text
        if message.content_type == "api/response" and "<registration>" in text:
            start = text.index("    <registration>")
            return text[start : text.index("</registration>", start) + len("</registration>\n")]
    raise SystemExit("no xmlstatus reply in in-api-registrations")


def xmlstatus_reply(count: int) -> bytes:
    row = xmlstatus_row_template()
    rows = []
    for i in range(count):
        ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        user = str(100000 + i)
        rows.append(
            row.replace("api-1001-tenant-a@127.0.0.10", f"bench-{i}@{ip}")
            .replace("127.0.0.10", ip)
            .replace("<sip-auth-user>1001<", f"<sip-auth-user>{user}<")
            .replace("1001@tenant-a.test", f"{user}@tenant-a.test")
        )
    head = '<?xml version="1.0" encoding="ISO-8859-1"?>\n<profile>\n  <registrations>\n'
    return (head + "".join(rows) + "  </registrations>\n</profile>\n").encode()


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM belongs to the address space,
    so unlike ru_maxrss it does not inherit the parent's peak across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def bench_events(count: int = 200_000) -> dict:
    stream = event_stream(count)
    table = SwitchTable()
    reader = MessageReader()
    started = time.perf_counter()
    applied = 0
    for offset in range(0, len(stream), 65536):  # as recv() would hand it over
        for message in reader.feed(stream[offset : offset + 65536]):
            change = change_from_event(message.event().headers, "fs1", time.time(), 90.0)
            if change is not None:
                table.apply(change)
                applied += 1
    elapsed = time.perf_counter() - started
    return {"events": applied, "seconds": round(elapsed, 3), "events_per_s": round(applied / elapsed)}


def bench_bootstrap_child(path: str) -> None:
    # The reply as the watcher holds it: one api/response body, read whole.
    baseline = peak_rss_mb()
    started = time.perf_counter()
    reply = Path(path).read_bytes()
    table = SwitchTable(parse_xmlstatus(reply, time.time(), profile="internal", switch="fs1"))
    cache = RegistrationCache()
    cache.replace("fs1", table)
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "registrations": len(table),
        "reply_mb": round(len(reply) / 1e6, 1),
        "seconds": round(elapsed, 3),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": baseline,
    }))


def bench_watcher_child(port: int) -> None:
    from gevent import monkey

    monkey.patch_all()
    from fsguard.config import SwitchConfig
    from fsguard.esl.watcher import Watcher

    baseline = peak_rss_mb()
    cache = RegistrationCache()
    watcher = Watcher(SwitchConfig("fs1", "127.0.0.1", port, "ClueCon"), cache, timeout=60.0, expiry_margin=90.0)
    started = time.perf_counter()
    watcher.start()
    if not watcher.wait_for(lambda w: w.live, 120):
        raise SystemExit(f"watcher never went live: {watcher.last_error}")
    elapsed = time.perf_counter() - started
    peak = peak_rss_mb()
    watcher.stop()
    print(json.dumps({"registrations": cache.size("fs1"), "seconds": round(elapsed, 3),
                      "peak_rss_mb": peak, "rss_before_mb": baseline}))


def bench_watcher_bootstrap() -> dict:
    from gevent import monkey

    monkey.patch_all()
    from fsguard.testing.switch import FakeSwitch

    reply = xmlstatus_reply(N)

    class BigSwitch(FakeSwitch):
        def api(self, command: str):
            if command == "sofia xmlstatus profile internal reg":
                return reply
            return super().api(command)

    with BigSwitch() as switch:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.registrations_bench", "--watcher-child", str(switch.address[1])],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
        )
    return json.loads(out.stdout)


def bench_bootstrap() -> dict:
    with tempfile.NamedTemporaryFile(suffix=".xml") as reply:
        reply.write(xmlstatus_reply(N))
        reply.flush()
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.registrations_bench", "--bootstrap-child", reply.name],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
        )
    return json.loads(out.stdout)


def bench_lookup(rounds: int = 200_000) -> dict:
    table = SwitchTable(parse_xmlstatus(xmlstatus_reply(N), time.time(), profile="internal", switch="fs1"))
    cache = RegistrationCache()
    cache.replace("fs1", table)
    policy, now = Policy(), time.time()
    calls = [
        CallFacts(uuid="u", source_ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                  auth_user=str(100000 + i), auth_realm="tenant-a.test", destination="9196")
        for i in range(0, N, N // 1000)
    ]
    samples = []
    for _ in range(rounds // len(calls)):
        started = time.perf_counter()
        for call in calls:
            answer = Registrations(call.identity, cache.bindings(call.identity, ("fs1",)), "cache")
            verdict = decide(call, answer, policy, now)
        samples.append((time.perf_counter() - started) / len(calls))
    assert verdict.allowed
    return {"bindings": len(table), "lookup_plus_verdict_us_median": round(statistics.median(samples) * 1e6, 2),
            "lookup_plus_verdict_us_max_batch": round(max(samples) * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--bootstrap-child", metavar="REPLY", help=argparse.SUPPRESS)
    parser.add_argument("--watcher-child", metavar="PORT", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bootstrap_child:
        bench_bootstrap_child(args.bootstrap_child)
        return
    if args.watcher_child:
        bench_watcher_child(args.watcher_child)
        return
    figures = {
        "events": bench_events(),
        "bootstrap_100k_parse": bench_bootstrap(),
        "bootstrap_100k_watcher": bench_watcher_bootstrap(),
        "lookup_100k": bench_lookup(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
