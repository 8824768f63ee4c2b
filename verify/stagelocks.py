"""Per-host stage locks of the verify suite (a pytest plugin, loaded by conftest.py).

Tests marked ``disruptive`` (lock a volume, reboot a VM, stop the S/MIME gate, reconverge a
host) would make tests on other xdist workers fail for reasons that are not theirs. So every
test holds, on the controller, one lock file per stage host it may touch: shared normally,
exclusive when disruptive. A disruptive test waits until nothing else uses its hosts, and
nothing that uses them starts until it is done.

Which hosts a test touches:

- no ``stage_hosts`` marker: every host of the inventory (the safe default);
- ``@pytest.mark.stage_hosts("ca_ra", "auth", ...)``: the named inventory groups or hosts,
  plus the test's own testinfra host (``--hosts`` parametrization) and, with
  ``param="name"``, the host named by that parametrized argument;
- a disruptive test takes its hosts exclusively, except those given as ``also=(...)``, which
  it only uses (a participant that sends mail through a rebooting relay) and takes shared.

The marker is a promise that is checked: while a test with a marker runs, a command that
testinfra's Ansible backend sends to a host outside its set fails the test, naming the host.
So a test cannot silently start touching a VM that a disruptive test is rebooting.

Locks are always taken in host-name order, so two tests never wait for each other in a
circle. At the end of the collection the disruptive tests go last, each followed by a share
of the marked tests that touch none of its hosts: those run on the other workers while a VM
reboots, instead of every worker waiting for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from waits import controller_lock

LOCK_DIR = Path("/tmp/safemail-verify-locks")
MARKER = "stage_hosts"

# The running test's allowed hosts (None: no marker, every host allowed). Tests run one at a
# time in a worker process; the lock is for testinfra's own threads, if any.
_allowed: set[str] | None = None
_allowed_test = ""
_guard_lock = threading.Lock()
_violations_key = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*groups_or_hosts, param=None, also=()): the only stage hosts the test "
        "touches (checked while it runs); without it a test may touch every host",
    )
    _install_guard()


# ------------------------------------------------------------------ which hosts
def _inventory(config: pytest.Config) -> str:
    return config.getoption("ansible_inventory", default=None) or "inventories/test"


@cache
def _runner(inventory: str):
    from testinfra.utils.ansible_runner import AnsibleRunner

    return AnsibleRunner(inventory)


@cache
def _hosts_of(inventory: str, pattern: str) -> tuple[str, ...]:
    """The inventory's hosts matching a group or host name; the name itself when there is no
    readable inventory (a suite without stage hosts still gets one lock per name)."""
    if not Path(inventory).exists():
        return (pattern,)
    return tuple(_runner(inventory).get_hosts(pattern)) or (pattern,)


def _resolve(config: pytest.Config, names) -> set[str]:
    hosts: set[str] = set()
    for name in names:
        hosts.update(_hosts_of(_inventory(config), str(name)))
    return hosts


def all_hosts(config: pytest.Config) -> set[str]:
    return _resolve(config, ["all"])


def _own_host(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    host = callspec.params.get("_testinfra_host") if callspec is not None else None
    if host is None:
        return None
    return host.backend.get_pytest_id().split("://", 1)[-1]


def item_hosts(item: pytest.Item) -> tuple[set[str], set[str]] | None:
    """(hosts the test takes exclusively, hosts it takes shared), or None without a marker."""
    mark = item.get_closest_marker(MARKER)
    if mark is None:
        return None
    config = item.config
    hosts = _resolve(config, mark.args)
    own = _own_host(item)
    if own:
        hosts.add(own)
    param = mark.kwargs.get("param")
    if param:
        callspec = getattr(item, "callspec", None)
        value = callspec.params.get(param) if callspec is not None else None
        if value is None:
            raise pytest.UsageError(f"{item.nodeid}: {MARKER}(param={param!r}) names no "
                                    "parametrized argument of the test")
        hosts.add(str(value))
    also = _resolve(config, mark.kwargs.get("also", ()))
    if item.get_closest_marker("disruptive") is None:
        return set(), hosts | also
    return hosts - also, also - hosts


def _disruptive(item: pytest.Item) -> bool:
    return item.get_closest_marker("disruptive") is not None


# ------------------------------------------------------------------ the locks
@contextlib.contextmanager
def stage_locks(item: pytest.Item) -> Iterator[None]:
    declared = item_hosts(item)
    if declared is None:
        every = all_hosts(item.config)
        exclusive, shared = (every, set()) if _disruptive(item) else (set(), every)
    else:
        exclusive, shared = declared
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    asked = time.time()
    with contextlib.ExitStack() as stack:
        for host in sorted(exclusive | shared):
            stack.enter_context(
                controller_lock(str(LOCK_DIR / f"{host}.lock"), host in exclusive, item))
        got = time.time()
        try:
            yield
        finally:
            _timeline(item, asked, got, exclusive, shared)


def _timeline(item: pytest.Item, asked: float, got: float, exclusive: set[str],
              shared: set[str]) -> None:
    """With SAFEMAIL_VERIFY_TIMELINE=FILE, append one JSON line per test: when it asked for its
    locks, got them and let them go, and which hosts it held how (bench/bench_stage.py reads
    it to show the suite's critical path)."""
    path = os.environ.get("SAFEMAIL_VERIFY_TIMELINE")
    if not path:
        return
    line = {"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "asked": round(asked, 2), "got": round(got, 2), "done": round(time.time(), 2),
            "exclusive": sorted(exclusive), "shared": sorted(shared)}
    with open(path, "a") as handle:  # one short append per test: atomic enough across workers
        handle.write(json.dumps(line) + "\n")


@pytest.fixture(autouse=True)
def _stage_lock(request: pytest.FixtureRequest):
    global _allowed, _allowed_test
    declared = item_hosts(request.node)
    with stage_locks(request.node):
        with _guard_lock:
            _allowed = None if declared is None else declared[0] | declared[1]
            _allowed_test = request.node.nodeid
        try:
            yield
        finally:
            with _guard_lock:
                _allowed, _allowed_test = None, ""


# ------------------------------------------------------------------ the promise, checked
class StageHostViolation(AssertionError):
    pass


def _check(hostname: str) -> None:
    with _guard_lock:
        allowed, test = _allowed, _allowed_test
    if allowed is not None and hostname not in allowed:
        raise StageHostViolation(
            f"{test} sent a command to {hostname}, which its {MARKER} marker does not name "
            f"(it names {', '.join(sorted(allowed)) or 'no host'}): add the host to the "
            "marker, or drop the marker so the test locks every host")


def _install_guard() -> None:
    from testinfra.backend import ansible as backend

    cls = backend.AnsibleBackend
    if getattr(cls, "_safemail_guarded", False):
        return
    run, run_ansible = cls.run, cls.run_ansible

    def guarded_run(self, *args, **kwargs):
        _check(self.host)
        return run(self, *args, **kwargs)

    def guarded_run_ansible(self, *args, **kwargs):
        _check(self.host)
        return run_ansible(self, *args, **kwargs)

    cls.run, cls.run_ansible = guarded_run, guarded_run_ansible
    cls._safemail_guarded = True


# ------------------------------------------------------------------ the order
def order(items: list[pytest.Item]) -> list[pytest.Item]:
    """Everything else first (stable order); then each disruptive test followed by its share
    of the marked tests that touch none of its hosts.

    The disruptive tests hold their hosts alone, so wherever they run the other workers wait
    unless there is work on other hosts; at the end of the run that work is there for them.
    A marked test goes after the compatible disruptive test with the fewest tests so far.
    """
    disruptive = [i for i in items if _disruptive(i)]
    if not disruptive:
        return list(items)
    holds = []
    for item in disruptive:
        declared = item_hosts(item)
        holds.append(all_hosts(item.config) if declared is None else declared[0])
    shares: list[list[pytest.Item]] = [[] for _ in disruptive]
    rest = []
    for item in items:
        if _disruptive(item):
            continue
        declared = item_hosts(item)
        uses = None if declared is None else declared[0] | declared[1]
        fits = [k for k, held in enumerate(holds) if uses is not None and not uses & held]
        if fits:
            shares[min(fits, key=lambda k: len(shares[k]))].append(item)
        else:
            rest.append(item)
    tail = []
    for item, share in zip(disruptive, shares, strict=True):
        tail += [item, *share]
    return rest + tail
