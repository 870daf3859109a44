"""Test helpers: read the repo's copy of the FreeSWITCH captures."""

from __future__ import annotations

import json
from pathlib import Path

from fsguard.esl.protocol import Message, MessageReader

CAPTURES = Path(__file__).resolve().parent.parent / "fsguard" / "testing" / "fixtures" / "freeswitch"


def capture_meta(name: str) -> dict:
    with open(CAPTURES / f"{name}.jsonl") as handle:
        return json.loads(handle.readline())["meta"]


def capture_messages(name: str, direction: str) -> list[Message]:
    reader = MessageReader(commands=direction == "app>fs")
    messages: list[Message] = []
    with open(CAPTURES / f"{name}.jsonl") as handle:
        handle.readline()
        for line in handle:
            entry = json.loads(line)
            if entry["dir"] == direction:
                messages += reader.feed(entry["data"].encode())
    assert reader.buffered == 0, f"{name}: bytes left over"
    return messages


def outbound_captures() -> list[str]:
    """Captures with a CHANNEL_DATA reply (a real call reached the app)."""
    names = []
    for path in sorted(CAPTURES.glob("out-*.jsonl")):
        if any(m.headers.get("Event-Name") == "CHANNEL_DATA" for m in capture_messages(path.stem, "fs>app")):
            names.append(path.stem)
    return names


def capture_timed_messages(name: str, direction: str) -> list[tuple[float, Message]]:
    """Messages with the time of the chunk that completed them."""
    reader = MessageReader(commands=direction == "app>fs")
    timed: list[tuple[float, Message]] = []
    with open(CAPTURES / f"{name}.jsonl") as handle:
        handle.readline()
        for line in handle:
            entry = json.loads(line)
            if entry["dir"] == direction:
                timed += [(entry["t"], m) for m in reader.feed(entry["data"].encode())]
    return timed
