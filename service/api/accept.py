"""``Accept`` negotiation (RFC 9110 section 12.5.1) for ``POST /generate``: JSON, an event stream,
or one raw image."""

from __future__ import annotations

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


def _ranges(accept: str) -> list[tuple[str, str, float]]:
    """(type, subtype, q) of each media range; a malformed q counts as 1 (lenient)."""
    out = []
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if "/" not in media:
            continue
        typ, sub = (x.strip().lower() for x in media.split("/", 1))
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(v)))
                except ValueError:
                    q = 1.0
        out.append((typ, sub, q))
    return out


def _match(media: str, ranges: list[tuple[str, str, float]]) -> tuple[float, int] | None:
    """(q, specificity) of the most specific range that covers ``media`` (2 exact, 1 type/*, 0
    */*), None if none does."""
    typ, sub = media.split("/")
    best: tuple[float, int] | None = None
    for rt, rs, q in ranges:
        spec = 2 if (rt, rs) == (typ, sub) else 1 if (rt, rs) == (typ, "*") else 0 if (rt, rs) == ("*", "*") else -1
        if spec >= 0 and (best is None or spec > best[1]):
            best = (q, spec)
    return best


def negotiate(accept: str | None, offered: list[str]) -> str | None:
    """The offered media type the client prefers: the highest q, then the most specific range
    naming it (``image/png`` over ``*/*``), then the order of ``offered`` (the first is the
    default: no Accept, or an empty one, gets it). None: nothing offered is acceptable (each is
    named by no range, or with q=0)."""
    if not accept or not accept.strip():
        return offered[0] if offered else None
    ranges = _ranges(accept)
    if not ranges:
        return offered[0] if offered else None
    scored = []
    for i, media in enumerate(offered):
        m = _match(media, ranges)
        if m is not None and m[0] > 0:
            scored.append((m[0], m[1], -i, media))
    return max(scored)[3] if scored else None


def refuses(accept: str | None, media: str) -> bool:
    """The client named ``media`` (or a range covering it) with q=0."""
    m = _match(media, _ranges(accept or ""))
    return m is not None and m[0] == 0
