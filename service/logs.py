"""Process logging: plain text or JSON lines (one object per record, for Loki, Elasticsearch or
Cloud Logging), and the API's access log.

A record's structured fields travel in ``extra={"fields": {...}}``: JSON lines carry them as keys,
text lines only the message.
"""

from __future__ import annotations

import json
import logging
import os
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "ldserve.access"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in ("ts", "level", "logger", "msg")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str) -> None:
    """Root logging for every ``ldserve`` command; uvicorn's loggers propagate to it (the CLI
    passes ``log_config=None``), so they share the format. Hugging Face progress bars (transformers
    draws one while loading the text encoder) are off unless HF_HUB_DISABLE_PROGRESS_BARS says
    otherwise: a server's log is not a terminal, and a JSON log takes nothing but JSON lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
