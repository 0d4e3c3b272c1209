"""`masqctl` starts without the daemon's config machinery; the defaults live in one place."""

from __future__ import annotations

import subprocess
import sys

from masqd import config, defaults


def test_masqctl_does_not_import_pydantic_or_the_config() -> None:
    # A fresh interpreter: this test process has long since imported both.
    code = (
        "import sys, masqd.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'"
        " or m == 'masqd.config')\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_config_takes_its_defaults_from_the_defaults_module() -> None:
    assert config.DEFAULT_SOCKET is defaults.DEFAULT_SOCKET
    assert config.DEFAULT_STATE_DIR is defaults.DEFAULT_STATE_DIR
    assert config.DEFAULT_CONFIG is defaults.DEFAULT_CONFIG
    assert config.DaemonConfig().socket == defaults.DEFAULT_SOCKET
    assert config.DaemonConfig().table == defaults.DEFAULT_TABLE
    assert config.DaemonConfig().metrics_listen == defaults.DEFAULT_METRICS_LISTEN
