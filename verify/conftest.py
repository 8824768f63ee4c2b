"""pytest plugin for the verify suite: requirement markers and evidence.

Every test proves one or more requirements of verify/requirements.yml and says which::

    @pytest.mark.req("MAIL-03")
    def test_plaintext_refused(host, evidence):
        reply = ...
        evidence(f"RCPT reply: {reply}")
        assert reply.startswith("550")

What this plugin does:

- registers the ``req`` marker;
- at collection, records each test's requirement ids as JUnit properties (``req``) and finds
  tests without a known id; such a test is turned into an error with a clear message (it
  cannot pass) and listed at the end of the run, and the report lists it too;
- provides the ``evidence`` fixture: ``evidence(text)`` attaches text (an SMTP reply, a file
  mode, a probe result) to the test as a JUnit property ``evidence``;
- keeps a module that declares ``testinfra_hosts`` on those hosts: ``safemail verify``
  passes ``--hosts=ansible://all``, and testinfra lets ``--hosts`` win over the module's own
  list, so the relay's mail tests would otherwise run (and fail) against every host;
- ``--req-select MAIL-03,NET-01`` runs only the tests of those requirements;
  ``--req-catalogue PATH`` reads another catalogue (default: requirements.yml next to this
  file).

It does not depend on which test modules exist.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from safemail.gate.catalogue import Catalogue, load_catalogue

CATALOGUE_PATH = Path(__file__).with_name("requirements.yml")
pytest_plugins = (
    "profiles",  # read_only/lab_participants markers, production profile, host keys
    "stagelocks",  # per-host locks: disruptive tests hold their hosts alone
)

_catalogue_key = pytest.StashKey[Catalogue]()
_problems_key = pytest.StashKey[list[str]]()
_not_redundant_key = pytest.StashKey[list[str]]()
# AV-02: tests marked `redundant_stage` need two relays and two directory hosts
# (`safemail lab up --redundant`); on any other stage they are deselected and listed.
REDUNDANT_GROUPS = ("relay", "auth")
_item_error_key = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("safemail", "SafeMail verification")
    group.addoption(
        "--req-catalogue",
        default=str(CATALOGUE_PATH),
        help="requirement catalogue (default: verify/requirements.yml)",
    )
    group.addoption(
        "--req-select",
        default=None,
        metavar="IDS",
        help="comma-separated requirement ids: run only their tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "req(*ids): requirement id(s) of verify/requirements.yml this test proves"
    )
    config.addinivalue_line(
        "markers",
        "redundant_stage: AV-02; the test needs two relays and two directory hosts "
        "(`safemail lab up --redundant`); deselected, with the reason, on other stages",
    )
    config.addinivalue_line(
        "markers",
        "first_of_group(group): the test runs on the group's first host only (the directory "
        "provider for auth); its other hosts' parameters are deselected at collection, so a "
        "replica counts neither as passed nor as skipped",
    )
    config.addinivalue_line(
        "markers",
        "disruptive: the test stops services, locks volumes, reboots or reconverges hosts; "
        "it holds its hosts alone (every host without a stage_hosts marker), across xdist "
        "workers",
    )
    # Evidence goes through record_property, which pytest flags under the xunit2 family;
    # safemail verify uses xunit1, other runs still get the properties.
    config.addinivalue_line(
        "filterwarnings", "ignore:record_property is incompatible:pytest.PytestWarning"
    )
    config.stash[_catalogue_key] = load_catalogue(config.getoption("--req-catalogue"))
    config.stash[_problems_key] = []
    _ssh_control_dir()


def _ssh_control_dir() -> None:
    """Create the directory of ansible.cfg's SSH ControlPath before testinfra reads the config.

    testinfra passes the ControlPath to ssh only if that directory exists; Ansible makes it
    on its first SSH connection, but under the Mitogen strategy it may never have. Without it
    every command of the suite would be a new SSH login (about 2 s each on an emulated VM).
    """
    import configparser
    import os

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(os.environ.get("ANSIBLE_CONFIG") or Path(__file__).resolve().parents[1]
             / "ansible.cfg")
    if not cfg.get("ssh_connection", "control_path", fallback=""):
        return
    # Where testinfra looks (utils/ansible_runner.py), with its default.
    directory = cfg.get("persistent_connection", "control_path_dir", fallback="~/.ansible/cp")
    Path(os.path.expanduser(directory)).mkdir(parents=True, exist_ok=True, mode=0o700)


def req_ids(item: pytest.Item) -> list[str]:
    """Requirement ids named by the item's ``req`` markers, in order, without duplicates."""
    ids: list[str] = []
    for mark in item.iter_markers(name="req"):
        for arg in mark.args:
            for part in str(arg).split(","):
                if part.strip() and part.strip() not in ids:
                    ids.append(part.strip())
    return ids


def _selection(config: pytest.Config) -> set[str] | None:
    raw = config.getoption("--req-select")
    if not raw:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _declared_hosts(config: pytest.Config, module: object, cache: dict) -> set[str] | None:
    declared = getattr(module, "testinfra_hosts", None)
    if declared is None:
        return None
    key = getattr(module, "__name__", id(module))
    if key not in cache:
        import testinfra

        hosts = testinfra.get_hosts(
            list(declared), ansible_inventory=config.getoption("ansible_inventory", None)
        )
        cache[key] = {h.backend.get_pytest_id() for h in hosts}
    return cache[key]


def _testinfra_host(item: pytest.Item):
    """The testinfra host an item is parametrized with (--hosts), or None."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("_testinfra_host") if callspec is not None else None


def _outside_declared_hosts(config: pytest.Config, items: list[pytest.Item]) -> list[pytest.Item]:
    """Items parametrized (by --hosts) with a host their module's testinfra_hosts excludes."""
    if not config.getoption("hosts", None):
        return []  # no --hosts: testinfra already used each module's own list
    cache: dict = {}
    outside = []
    for item in items:
        host = _testinfra_host(item)
        if host is None:
            continue
        allowed = _declared_hosts(config, getattr(item, "module", None), cache)
        if allowed is not None and host.backend.get_pytest_id() not in allowed:
            outside.append(item)
    return outside


def _group_sizes(config: pytest.Config) -> dict[str, int]:
    """Hosts per inventory group of the stage under test (ansible-inventory, as testinfra)."""
    import stagegroups

    return {g: len(hosts) for g, hosts in stagegroups.groups(config, strict=False).items()}


def _not_on_this_stage(config: pytest.Config, items: list[pytest.Item]) -> list[pytest.Item]:
    """Items marked redundant_stage when the stage lacks a second relay or directory host."""
    marked = [i for i in items if i.get_closest_marker("redundant_stage") is not None]
    if not marked:
        return []
    sizes = _group_sizes(config)
    short = [f"{g}: {sizes.get(g, 0)} host(s)" for g in REDUNDANT_GROUPS if sizes.get(g, 0) < 2]
    if not short:
        return []
    reason = ("needs a redundant stage (two relays, two directory hosts: `safemail lab up "
              f"--redundant`); this one has {', '.join(short)}")
    config.stash[_not_redundant_key] = [f"{i.nodeid}: {reason}" for i in marked]
    return marked


def _not_the_first_of_group(config: pytest.Config, items: list[pytest.Item]) -> list[pytest.Item]:
    """Items marked first_of_group(g) whose testinfra host is not g's first host.

    Stops the run (UsageError) rather than deselect every parameter of a group: a first host
    that matches none of them (an unreadable inventory, a non-Ansible --hosts backend) would
    otherwise drop the tests silently and leave the report green."""
    marked = []
    for item in items:
        mark = item.get_closest_marker("first_of_group")
        host = _testinfra_host(item)
        if mark is not None and host is not None:
            marked.append((item, mark.args[0], host.backend.get_pytest_id()))
    if not marked:
        return []
    import stagegroups  # only with marked items: a suite without them needs no inventory

    firsts: dict[str, str] = {}
    out = []
    on_first: set[str] = set()
    for item, group, host_id in marked:
        if not host_id.startswith("ansible://"):
            raise pytest.UsageError(f"first_of_group({group!r}) on {item.nodeid}: the host "
                                    f"{host_id} is not an Ansible inventory host")
        if group not in firsts:
            try:
                first = stagegroups.first_host(config, group)
            except RuntimeError as exc:
                raise pytest.UsageError(f"first_of_group({group!r}): {exc}") from exc
            if first is None:
                raise pytest.UsageError(f"first_of_group({group!r}) on {item.nodeid}: the "
                                        f"inventory {stagegroups.inventory(config)} has no "
                                        f"{group} host")
            firsts[group] = first
        if host_id == f"ansible://{firsts[group]}":
            on_first.add(group)
        else:
            out.append(item)
    lost = sorted(set(firsts) - on_first)
    if lost:
        raise pytest.UsageError(
            f"first_of_group: no collected test runs on the first host of {', '.join(lost)} "
            f"({', '.join(firsts[g] for g in lost)}); the tests' hosts and the inventory "
            f"{stagegroups.inventory(config)} disagree")
    return out


def _drop(config: pytest.Config, items: list[pytest.Item], gone: list[pytest.Item]) -> None:
    if gone:
        config.hook.pytest_deselected(items=gone)
        ids = {id(i) for i in gone}
        items[:] = [i for i in items if id(i) not in ids]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    _drop(config, items, _not_on_this_stage(config, items))
    _drop(config, items, _outside_declared_hosts(config, items))
    _drop(config, items, _not_the_first_of_group(config, items))
    catalogue = config.stash[_catalogue_key]
    known = set(catalogue.ids)
    selection = _selection(config)
    if selection is not None:
        unknown_sel = sorted(selection - known)
        if unknown_sel:
            raise pytest.UsageError(
                f"--req-select names unknown requirement id(s): {', '.join(unknown_sel)} "
                f"(catalogue: {catalogue.origin})"
            )
    problems = config.stash[_problems_key]
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        ids = req_ids(item)
        unknown = [i for i in ids if i not in known]
        if not ids:
            message = (
                'no requirement marker: add @pytest.mark.req("AREA-NN") naming the '
                f"requirement this test proves (ids are in {catalogue.origin})"
            )
        elif unknown:
            message = (
                f"unknown requirement id(s) {', '.join(unknown)}: not in {catalogue.origin}; "
                "fix the marker or add the requirement to the catalogue"
            )
        else:
            message = ""
        if selection is not None and not (set(ids) & selection) and not message:
            dropped.append(item)
            continue
        for rid in ids:
            item.user_properties.append(("req", rid))
        if message:
            item.stash[_item_error_key] = message
            item.user_properties.append(("req_error", message))
            problems.append(f"{item.nodeid}: {message}")
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    # Disruptive tests last, with the tests that can run beside them (verify/stagelocks.py).
    items[:] = config.pluginmanager.get_plugin("stagelocks").order(items)


def pytest_runtest_setup(item: pytest.Item) -> None:
    message = item.stash.get(_item_error_key, None)
    if message:
        # An error, not a skip: a test that proves no known requirement must not look green.
        pytest.fail(f"SafeMail requirement marker error: {message}", pytrace=False)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    del exitstatus
    not_here = config.stash.get(_not_redundant_key, [])
    if not_here:
        terminalreporter.section(f"SafeMail: {len(not_here)} AV-02 test(s) not selected",
                                 sep="=", bold=True)
        for line in not_here:
            terminalreporter.write_line(line)
    problems = list(config.stash.get(_problems_key, []))
    # Under xdist the workers collect; their setup errors carry the message instead.
    for report in terminalreporter.stats.get("error", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "req_error":
                line = f"{report.nodeid}: {value}"
                if line not in problems:
                    problems.append(line)
    if problems:
        terminalreporter.section("SafeMail requirement markers", sep="=", red=True, bold=True)
        for line in problems:
            terminalreporter.write_line(line)


@pytest.fixture
def evidence(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """Attach evidence text to the current test; it lands in the JUnit XML and the report."""

    def attach(text: str) -> None:
        record_property("evidence", str(text))

    return attach
