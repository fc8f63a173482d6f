"""The download engine's defaults, in a module that imports nothing (and outside ``airpack.fetch``).

``segments.EngineOptions`` and ``ops.pack.PackOptions`` both default to these,
so one change moves both; ``PackOptions`` is imported where no HTTP client may
be loaded (the offline CLI commands), hence not from ``segments`` itself.
"""

DEFAULT_CONNECTIONS = 16
DEFAULT_SEGMENT = 64 * 1024 * 1024
DEFAULT_RETRIES = 5
DEFAULT_RETRY_BASE = 1.0
MAX_WAIT = 60.0  # the longest pause a Retry-After or RateLimit reset may impose on one retry
DEFAULT_TIMEOUT = 30.0  # seconds per connect and per read
