"""ldserve: HTTP API, Redis Streams queue, batched GPU worker and Prometheus metrics.

No module in this package imports torch at import time except ``worker`` and ``engine_client``;
the API process stays torch-free.
"""

__version__ = "0.1.0"
