"""`safemail patch`: patch status of every host, and the manual, logged patch run."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from safemail import ansible
from safemail.errors import SafeMailError, UsageError
from safemail.gate import promote
from safemail.inventory import read_inventory
from safemail.ops import apply, status
from safemail.project import STAGES, Project


def _hosts_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one host")
    return names


def cmd_status(args: argparse.Namespace) -> int:
    project = Project.find()
    hosts = status.inventory_hosts(project.inventory(args.stage), args.hosts)
    results = status.collect(hosts, repo=project.root)
    if args.json:
        print(json.dumps(status.to_json(results), indent=2))
    else:
        print(status.render_table(status.rows(results, dt.datetime.now(dt.UTC))))
    code = status.exit_code(results)
    if code == 3:
        down = [r.host for r in results if not r.reachable]
        print(f"unreachable: {', '.join(down)}")
    return code


def cmd_apply(args: argparse.Namespace) -> int:
    project = Project.find()
    repo = project.root
    operator = (args.operator or promote.default_operator()).strip()
    if not operator:
        raise UsageError("--operator must name the person applying the patches")
    if args.stage == "production":
        report = project.path(args.report)
        decision = promote.evaluate(repo, report, max_age_hours=args.max_age_hours)
        test_hosts = status.inventory_hosts(project.inventory("test"))
        refusals = apply.production_refusals(decision,
                                             status.collect(test_hosts, repo=project.root))
        if refusals:
            print("patching production refused:\n  - " + "\n  - ".join(refusals))
            return 3
        print(decision.summary())
    hosts = status.inventory_hosts(project.inventory(args.stage), args.hosts)
    cmd = apply.playbook_command(project, args.stage, [h.name for h in hosts], operator)
    rc = ansible.run(cmd, repo)
    if rc != 0:
        raise SafeMailError(
            f"the patch run failed (ansible-playbook exit {rc}); hosts after the failed one "
            "were not touched",
            "read the failed host's admin log (/var/log/safemail-admin/admin.log) and the "
            "output above",
        )
    print(f"patched {len(hosts)} host(s) on the {args.stage} stage; each run is recorded in "
          "the host's admin log")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    register_status(sub)
    _register_patch(sub)
    register_backup(sub)


def _register_patch(sub: argparse._SubParsersAction) -> None:
    patch = sub.add_parser("patch", help="patch status of every host; the manual patch run",
                           description="Patch watch results and manual, logged patch runs.")
    psub = patch.add_subparsers(dest="patch_command", metavar="ACTION")
    psub.required = True

    p = psub.add_parser("status", help="collect every host's patch status (exit 3 if a host "
                                       "is unreachable, 4 if a check failed or is missing)")
    p.add_argument("--stage", choices=STAGES, default="test",
                   help="which inventory (default: test)")
    p.add_argument("--hosts", type=_hosts_arg, default=None,
                   help="comma-separated host names (default: every service host)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = psub.add_parser("apply", help="apply pending updates host by host and log each run "
                                      "(production only when the promotion gate allows)")
    p.add_argument("--stage", choices=STAGES, required=True,
                   help="test, or production (needs a passing test-stage report of this "
                        "revision and a fully patched test stage)")
    p.add_argument("--hosts", type=_hosts_arg, default=None,
                   help="comma-separated host names (default: every service host)")
    p.add_argument("--operator", default=None,
                   help="who applies the patches (default: the sudo/login user)")
    p.add_argument("--report", type=Path, default=promote.DEFAULT_REPORT,
                   help=f"test-stage report for the gate (default {promote.DEFAULT_REPORT})")
    p.add_argument("--max-age-hours", type=float, default=promote.DEFAULT_MAX_AGE_HOURS,
                   help="oldest acceptable report (default %(default)s h)")
    p.set_defaults(func=cmd_apply)


def cmd_backup_status(args: argparse.Namespace) -> int:
    from safemail.ops import backup

    if args.max_age_hours <= 0:
        raise UsageError("--max-age-hours must be positive")
    project = Project.find()
    hosts = backup.inventory_clients(project.inventory(args.stage), args.hosts)
    results = backup.collect(hosts, repo=project.root)
    if args.json:
        print(json.dumps([r.to_json(args.max_age_hours) for r in results], indent=2))
    else:
        print(backup.render_table(backup.rows(results, args.max_age_hours)))
    return backup.exit_code(results, args.max_age_hours)


def register_backup(sub: argparse._SubParsersAction) -> None:
    from safemail.ops.backup import DEFAULT_STALE_HOURS

    b = sub.add_parser("backup", help="backup state of every backup client (AV-01)",
                       description="Backups (roles/backup, docs/availability.md).")
    bsub = b.add_subparsers(dest="backup_command", metavar="ACTION")
    bsub.required = True
    p = bsub.add_parser(
        "status",
        help="per client: repository reachable, newest archive and its age (exit 3 if a "
             "client or repository is unreachable, 4 if a backup is stale or missing)",
        description="Asks each client's repository (through the client, with its key and "
                    "passphrase) for its newest archive. Exit 0 all fresh, 3 unreachable, "
                    "4 stale or missing.")
    p.add_argument("--stage", choices=STAGES, default="test",
                   help="which inventory (default: test)")
    p.add_argument("--hosts", type=_hosts_arg, default=None,
                   help="comma-separated client names (default: every backup client)")
    p.add_argument("--max-age-hours", type=float, default=DEFAULT_STALE_HOURS,
                   help="a newest archive older than this is stale (default %(default)s h)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backup_status)


def cmd_stage_status(args: argparse.Namespace) -> int:
    from safemail.ops import health

    if args.json and args.prometheus:
        raise UsageError("choose one of --json and --prometheus")
    thresholds = health.Thresholds(
        max_active=args.max_active, max_deferred=args.max_deferred, max_hold=args.max_hold,
        max_deferred_age_hours=args.max_deferred_age_hours,
        backup_max_age_hours=args.backup_max_age_hours,
        report_max_age_hours=args.report_max_age_hours)
    thresholds.check()
    if args.textfile and not args.textfile.parent.is_dir():  # before minutes of probing
        raise UsageError(f"{args.textfile.parent} is not a directory",
                         "node_exporter reads /var/lib/prometheus/node-exporter/*.prom")
    project = Project.find()
    everyone = read_inventory(project.inventory(args.stage))
    hosts = status.select_hosts(everyone, names=args.hosts)
    stage_hosts = status.select_hosts(everyone)  # the failover mode is the whole stage's
    address = health.service_address(stage_hosts)
    now = dt.datetime.now(dt.UTC)
    results = health.collect(hosts, thresholds, now, with_backup=not args.no_backup,
                             repo=project.root, address=address)
    fail = health.failover(results, stage_hosts)
    prom = health.to_prometheus(results, args.stage, now, fail)
    if args.textfile:
        health.write_textfile(prom, args.textfile)
    if args.json:
        print(json.dumps(health.to_json(results, args.stage, now, thresholds, fail), indent=2))
    elif args.prometheus:
        print(prom, end="")
    else:
        print(health.render_table(results, fail))
    return health.exit_code(results)


def register_status(sub: argparse._SubParsersAction) -> None:
    from safemail.ops.backup import DEFAULT_STALE_HOURS
    from safemail.ops.health import Thresholds

    t = Thresholds()
    p = sub.add_parser(
        "status",
        help="health of every service host: reachable, services, volume, queue, gate, "
             "backups, certificates, patches, failover (exit 3 unreachable, 4 unhealthy)",
        description="Probes every service host of the stage over SSH (Ansible's connection; "
                    "a read-only probe sent on stdin, nothing installed) and names each "
                    "problem per host. Exit 0 all healthy, 3 a host unreachable, 4 a host "
                    "unhealthy. Forms: a table (default), --json, --prometheus (node_exporter "
                    "textfile format; --textfile writes it atomically). Alert rules: "
                    "monitoring/prometheus/safemail-rules.yml; docs/availability.md, "
                    "'Monitoring'.")
    p.add_argument("--stage", choices=STAGES, default="test",
                   help="which inventory (default: test)")
    p.add_argument("--hosts", type=_hosts_arg, default=None,
                   help="comma-separated host names (default: every service host)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--prometheus", action="store_true",
                      help="print the Prometheus textfile (safemail_* metrics)")
    p.add_argument("--textfile", type=Path, default=None, metavar="PATH",
                   help="also write the Prometheus textfile to PATH atomically, e.g. "
                        "/var/lib/prometheus/node-exporter/safemail.prom")
    p.add_argument("--no-backup", action="store_true",
                   help="skip the backup check (it asks every client's repository: slowest)")
    p.add_argument("--max-active", type=int, default=t.max_active,
                   help="more mails in a relay's active queue are a problem (default %(default)s)")
    p.add_argument("--max-deferred", type=int, default=t.max_deferred,
                   help="more deferred mails are a problem (default %(default)s)")
    p.add_argument("--max-hold", type=int, default=t.max_hold,
                   help="more held mails are a problem (default %(default)s)")
    p.add_argument("--max-deferred-age-hours", type=float, default=t.max_deferred_age_hours,
                   help="an older deferred mail is a problem (default %(default)s h)")
    p.add_argument("--backup-max-age-hours", type=float, default=DEFAULT_STALE_HOURS,
                   help="an older newest archive is a problem (default %(default)s h)")
    p.add_argument("--report-max-age-hours", type=float, default=t.report_max_age_hours,
                   help="an older patch check or certificate expiry report is a problem "
                        "(default %(default)s h)")
    p.set_defaults(func=cmd_stage_status)
