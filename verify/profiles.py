"""pytest plugin for the verify suite: what a test does to a host, the production profile, and
the host keys seen in the run. Loaded by verify/conftest.py (``pytest_plugins``).

Markers (a test may carry several):

- ``read_only``: the test only reads: runs commands that change nothing, opens connections
  that are refused or closed without effect, reads files. Nothing is written, restarted,
  sent or queued on any host.
- ``disruptive`` (declared in conftest.py): stops services, locks volumes, reboots,
  reconverges.
- ``lab_participants``: needs the lab's participant hosts (practice1/2) or other lab-only
  machinery (the internet sink, the lab mirror, the lab's own keys).

``--safemail-profile production`` (``safemail verify --stage production``) runs only tests
marked ``read_only`` that are neither ``disruptive`` nor ``lab_participants``; every other
test is deselected, and each one is listed with the reason (terminal summary and, with
``--safemail-profile-skipped FILE``, one JSON object per line for the report). An unmarked
test is not known to be harmless, so it is skipped in production. A test marked both
``read_only`` and ``disruptive`` is a contradiction and stops the run.

Host keys: for every host a test runs against (testinfra's ``host``), the first test of each
worker reads the host's public SSH host keys through the run's own connection (which checked
them against the stage's known_hosts) and records each fingerprint as a JUnit property
``host_key`` = ``<host> SHA256:...``. The report lists them; the gate compares them with the
stage's known_hosts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safemail.gate.signing import fingerprint_of_public_key

PROFILES = ("full", "production")
HOST_KEY_COMMAND = "cat /etc/ssh/ssh_host_*_key.pub"

_seen_hosts_key = pytest.StashKey[dict[str, list[str]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("safemail", "SafeMail verification")
    group.addoption(
        "--safemail-profile",
        choices=PROFILES,
        default="full",
        help="full: every test (the test stage); production: only read-only tests that need "
        "no lab host (default: full)",
    )
    group.addoption(
        "--safemail-profile-skipped",
        default=None,
        metavar="FILE",
        help="write the tests the profile left out, one JSON object per line",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "read_only: the test only reads from hosts; it changes, restarts, sends and queues "
        "nothing (the production profile runs only these)",
    )
    config.addinivalue_line(
        "markers",
        "lab_participants: the test needs the lab's participant hosts or other lab-only "
        "machinery (never run against production)",
    )
    config.stash[_seen_hosts_key] = {}


def profile_reason(item: pytest.Item) -> str | None:
    """Why the production profile leaves the item out, or None if it runs it."""
    read_only = item.get_closest_marker("read_only") is not None
    disruptive = item.get_closest_marker("disruptive") is not None
    if read_only and disruptive:
        raise pytest.UsageError(
            f"{item.nodeid} is marked both read_only and disruptive: remove one"
        )
    if disruptive:
        return "disruptive: stops, locks, reboots or reconverges a host"
    if item.get_closest_marker("lab_participants") is not None:
        return "needs the lab's participant hosts or lab-only machinery"
    if not read_only:
        return "not marked read_only: it may change a host (send, write, restart)"
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    del session
    skipped: list[dict[str, str]] = []
    keep: list[pytest.Item] = []
    for item in items:
        reason = profile_reason(item)  # also refuses contradictory markers in every profile
        if config.getoption("--safemail-profile") == "production" and reason is not None:
            skipped.append({"id": item.nodeid, "reason": reason})
        else:
            keep.append(item)
    if skipped:
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    config.stash[_skipped_key] = skipped
    path = config.getoption("--safemail-profile-skipped")
    # Under xdist only the workers collect (the controller never runs this hook), each the
    # same items: the first worker writes the list; without xdist the one process does.
    worker = getattr(config, "workerinput", {}).get("workerid")
    if path and worker in (None, "gw0"):
        Path(path).write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")


_skipped_key = pytest.StashKey[list[dict[str, str]]]()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    del exitstatus
    if config.getoption("--safemail-profile") != "production":
        return
    skipped = config.stash.get(_skipped_key, None)
    path = config.getoption("--safemail-profile-skipped")
    if skipped is None and path and Path(path).is_file():  # the xdist controller: from gw0
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        skipped = [json.loads(line) for line in lines if line.strip()]
    skipped = skipped or []
    terminalreporter.section(
        f"SafeMail production profile: {len(skipped)} test(s) not run", sep="=", bold=True
    )
    for entry in skipped:
        terminalreporter.write_line(f"{entry['id']}: {entry['reason']}")


def fingerprints(text: str) -> list[str]:
    """OpenSSH SHA256 fingerprints of the public key lines in ``text``."""
    return sorted({fp for line in text.splitlines() if (fp := fingerprint_of_public_key(line))})


@pytest.fixture(autouse=True)
def _record_host_keys(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    host = callspec.params.get("_testinfra_host") if callspec is not None else None
    if host is None:
        return
    seen = request.config.stash[_seen_hosts_key]
    name = host.backend.get_pytest_id().split("://", 1)[-1]
    if name in seen:
        return
    if "_stage_lock" in request.fixturenames:
        # Read the keys inside conftest's stage lock, never while a disruptive test on another
        # worker has the stage (a rebooting host would only make this read fail).
        request.getfixturevalue("_stage_lock")
    try:
        result = host.run(HOST_KEY_COMMAND)
    except Exception:  # noqa: BLE001 - an unreachable host fails its own test, not this one
        return  # tried again by the next test on this host
    found = fingerprints(result.stdout) if result.rc == 0 else []
    if not found:
        return
    seen[name] = found
    for fp in found:
        request.node.user_properties.append(("host_key", f"{name} {fp}"))
