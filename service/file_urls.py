"""Signed, expiring links to generated files: the OpenAI Images API's ``response_format: "url"``.

``GET /v1/images/files/{job_id}/{index}.{ext}?expires=<unix s>&signature=<hex>`` needs no bearer
key (an ``<img src>``, a browser tab or a CDN cannot send one); the link itself is the credential,
like the expiring blob URLs OpenAI answers with. The signature is HMAC-SHA256, truncated to 128
bits, over the job, file name and expiry, with a key from the ``url_signing_key`` setting or, if
unset, one random key shared by every API process through Redis (``{prefix}:url_signing_key``,
created once with SET NX). A link expires with its job's record (``job_ttl_s`` after the job
finished), which holds the file.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEX = 32


def signature(key: bytes, job_id: str, name: str, expires: int) -> str:
    """Hex HMAC of one file of one job until ``expires`` (unix seconds)."""
    return hmac.new(key, f"{job_id}/{name}?{expires}".encode(), hashlib.sha256).hexdigest()[:SIGNATURE_HEX]


def file_path(job_id: str, index: int, ext: str) -> str:
    return f"/v1/images/files/{job_id}/{index}.{ext}"


def signed_url(base_url: str, key: bytes, job_id: str, index: int, ext: str, expires: int) -> str:
    """Absolute link to image ``index`` of a job (``base_url``: scheme and host, no trailing slash)."""
    sig = signature(key, job_id, f"{index}.{ext}", expires)
    return f"{base_url}{file_path(job_id, index, ext)}?expires={expires}&signature={sig}"


def check(key: bytes, job_id: str, name: str, expires: int, sig: str, now: float) -> str | None:
    """None if the link is valid now, else the error code: ``invalid_signature`` or ``url_expired``
    (the signature is checked first, so an altered expiry reads as invalid, not expired)."""
    if not hmac.compare_digest(signature(key, job_id, name, expires).encode(), sig.lower().encode()):  # any text
        return "invalid_signature"
    if now > expires:
        return "url_expired"
    return None
