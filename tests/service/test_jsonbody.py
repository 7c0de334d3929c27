"""Response bodies written by api/jsonbody.py: base64 spliced into compact JSON."""

from __future__ import annotations

import base64
import json
import os

import pytest

from service.api import jsonbody
from service.api.events import sse
from service.api.jsonbody import Base64, dumps


def test_files_become_their_base64_strings_in_place() -> None:
    files = [os.urandom(n) for n in (0, 1, 2, 3, 100_000)]
    body = {"data": [{"b64_json": Base64(f), "seed": i, "note": "é \u2028 \"q\""} for i, f in enumerate(files)],
            "usage": {"n": 5.5, "none": None}, "first": Base64(b"\xff")}
    plain = {"data": [{"b64_json": base64.b64encode(f).decode(), "seed": i, "note": "é \u2028 \"q\""}
                      for i, f in enumerate(files)], "usage": {"n": 5.5, "none": None}, "first": "/w=="}
    out = dumps(body)
    assert json.loads(out) == plain
    assert out == json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode()


def test_other_objects_and_nan_are_refused() -> None:
    with pytest.raises(TypeError, match="bytes"):
        dumps({"x": b"raw"})
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})


def test_a_body_holding_the_marker_is_refused() -> None:
    """The marker is a random 128-bit token, so only a body built to hold it could."""
    with pytest.raises(ValueError, match="marker"):
        dumps({"x": Base64(b"a"), "y": jsonbody._MARK})


def test_server_sent_events_carry_files_on_one_line() -> None:
    data = os.urandom(5000)
    event = sse("completed", {"b64_json": Base64(data), "text": "line\nbreak"})
    name, line, end = event.split(b"\n", 2)
    assert name == b"event: completed" and end == b"\n"
    assert json.loads(line.removeprefix(b"data: ")) == {"b64_json": base64.b64encode(data).decode(),
                                                         "text": "line\nbreak"}
