#!/usr/bin/env python3
"""Container health check: exit 0 when a URL answers 2xx within the timeout, else 1.

Default URL: the API readiness route on $LDSERVE_PORT (8000). The worker passes its own readiness
route on its metrics port: ``ldserve-healthcheck http://127.0.0.1:9101/health/ready``.
Standard library only (no curl in the image).
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("LDSERVE_PORT", "8000")
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{port}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (fixed local URL)
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
