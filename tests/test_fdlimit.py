"""The descriptor budget: limit raised, listener caps fitted under it, a reserve kept."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from masqd.fdlimit import LINGERING, OPENED_LATER, RESERVE, fit_caps


def test_caps_that_fit_are_kept() -> None:
    budget = fit_caps(soft=65536, in_use=20, api=1024, metrics=64)
    assert (budget.api, budget.metrics, budget.cut) == (1024, 64, False)


def test_over_the_limit_the_metrics_port_gives_way_first_then_the_api() -> None:
    # 1,024 free after the reserve and the lingering refusals: the API keeps 1,000, metrics
    # gets what is left.
    budget = fit_caps(
        soft=1024 + 20 + OPENED_LATER + RESERVE + LINGERING, in_use=20, api=1000, metrics=64
    )
    assert (budget.api, budget.metrics, budget.cut) == (1000, 24, True)
    budget = fit_caps(soft=1024, in_use=20, api=1024, metrics=64)
    assert budget.cut and budget.metrics == 1
    assert budget.api == 1024 - 20 - OPENED_LATER - RESERVE - LINGERING - 1
    assert budget.api + budget.metrics + 20 + OPENED_LATER + LINGERING + RESERVE <= 1024


def test_a_hopeless_limit_still_leaves_one_connection_each() -> None:
    budget = fit_caps(soft=50, in_use=40, api=1024, metrics=64)
    assert (budget.api, budget.metrics) == (1, 1)


def _run(program: str, soft: int, hard: int) -> object:
    """`program` in a child process whose descriptor limit is `soft`:`hard`; its JSON output."""
    prologue = f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
    out = subprocess.run(
        [sys.executable, "-c", prologue + program],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_start_up_raises_the_soft_limit_to_the_hard_one() -> None:
    program = (
        "import json, resource\n"
        "from masqd.fdlimit import raise_limit\n"
        "limits = raise_limit()\n"
        "print(json.dumps([limits.soft, limits.raised_from,"
        " resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))\n"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 2048, "the test needs a hard limit above 1,024"
    assert _run(program, 1024, hard) == [hard, 1024, hard]


def test_the_guard_says_low_within_the_reserve_of_the_limit() -> None:
    # Open descriptors one by one under a soft limit of 256: the guard turns low exactly
    # when the next free one is within the reserve, and stays low at the limit (EMFILE).
    program = (
        "import json, os\n"
        "from masqd.fdlimit import Guard, RESERVE\n"
        "guard = Guard(256)\n"
        "fds, first_low = [], None\n"
        "while True:\n"
        "    if guard.low() and first_low is None:\n"
        "        first_low = len(os.listdir('/proc/self/fd')) - 1\n"
        "    try:\n"
        "        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "    except OSError:\n"
        "        break\n"
        "print(json.dumps([first_low, 256 - RESERVE, guard.low()]))\n"
    )
    first_low, threshold, at_limit = _run(program, 256, 256)  # type: ignore[misc]
    assert first_low == threshold
    assert at_limit is True


def test_the_systemd_unit_gives_the_default_caps_their_descriptors() -> None:
    from masqd.config import DaemonConfig
    from tests.test_deploy import SYSTEMD, unit_directives

    (limit,) = unit_directives(SYSTEMD / "masqd.service")["Service.LimitNOFILE"]
    defaults = DaemonConfig()
    # 50 in use at start-up is generous: a started daemon holds about 15.
    budget = fit_caps(
        soft=int(limit),
        in_use=50,
        api=defaults.max_connections,
        metrics=defaults.metrics_max_connections,
    )
    assert not budget.cut
