"""Built-in paths and defaults, shared by the daemon's config and by `masqctl`.

Kept apart from `config` (and free of imports) so that `masqctl`, which only needs the
default socket, starts without loading pydantic: that import alone costs about as much as
everything else `masqctl` does. `config` takes its defaults from here, so there is one
place to change them.
"""

from __future__ import annotations

DEFAULT_CONFIG = "/etc/masqd/masqd.toml"
DEFAULT_SOCKET = "/run/masqd/masqd.sock"
DEFAULT_STATE_DIR = "/run/masqd"
DEFAULT_TABLE = "masqd"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9810"
ENV_PREFIX = "MASQD_"
ENV_CONFIG = "MASQD_CONFIG"
