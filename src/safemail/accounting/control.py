"""`safemail accounting`: the controller side of the subsidy accounting.

``safemail accounting bill --stage S --quarter 2026Q3`` runs playbooks/accounting-bill.yml:
every relay bills the closed quarter (capped payouts, then anonymisation) and its statement
lands in reports/accounting/<quarter>-<relay>.csv. Everything else (counts of the running
quarter, the maintenance window, status) is ``safemail-accounting`` on the relay.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safemail import vault
from safemail.accounting.ledger import normalise_quarter
from safemail.errors import SafeMailError, UsageError
from safemail.gate import promote
from safemail.ops import apply
from safemail.project import project_root


def bill_command(ansible_playbook: str, repo: Path, stage: str, quarter: str, operator: str,
                 check: bool = False) -> list[str]:
    if stage not in apply.STAGES:
        raise UsageError(f"unknown stage {stage!r}", f"use one of {', '.join(apply.STAGES)}")
    if not operator.strip():
        raise UsageError("--operator must name the person who bills")
    inventory = repo / "inventories" / stage
    cmd = [ansible_playbook, "-i", str(inventory), *vault.vault_args(repo, inventory),
           str(repo / "playbooks" / "accounting-bill.yml"),
           "-e", f"accounting_quarter={normalise_quarter(quarter)}",
           "-e", f"accounting_operator={operator.strip()}"]
    return [*cmd, "--check"] if check else cmd


def cmd_bill(args: argparse.Namespace) -> int:
    repo = project_root()
    operator = args.operator or promote.default_operator()
    cmd = bill_command(apply.ansible_playbook_command(), repo, args.stage, args.quarter,
                       operator, args.check)
    rc = apply.run_playbook(cmd, repo)
    if rc != 0:
        raise SafeMailError(f"billing failed (ansible-playbook exit {rc})",
                            "read the output above: a running quarter is refused")
    if not args.check:
        print(f"statements: {repo / 'reports' / 'accounting'}/"
              f"{normalise_quarter(args.quarter)}-<relay>.csv (participant numbers: keep them "
              "for the paying office only)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    acc = sub.add_parser("accounting", help="bill a closed quarter of the subsidy (ACC-02/03)",
                         description="The subsidy accounting from the controller. Counting, "
                                     "window and status: safemail-accounting on the relay.")
    asub = acc.add_subparsers(dest="accounting_command", metavar="ACTION")
    asub.required = True
    p = asub.add_parser("bill", help="bill a closed quarter on every relay, fetch the "
                                     "statements, anonymise the records")
    p.add_argument("--stage", choices=apply.STAGES, required=True)
    p.add_argument("--quarter", required=True, help="YYYYQn, a quarter that is over")
    p.add_argument("--operator", default=None,
                   help="who bills (default: the sudo/login user); recorded in the admin log")
    p.add_argument("--check", action="store_true", help="check mode: bill nothing")
    p.set_defaults(func=cmd_bill)
