"""`safemail accounting`: the controller side of the subsidy accounting.

``safemail accounting bill --stage S --quarter 2026Q3`` runs playbooks/accounting-bill.yml:
every relay bills the closed quarter (capped payouts, then anonymisation) and its statement
lands in reports/accounting/<quarter>-<relay>.csv. Everything else (counts of the running
quarter, the maintenance window, status) is ``safemail-accounting`` on the relay.
"""

from __future__ import annotations

import argparse

from safemail import ansible
from safemail.accounting.ledger import normalise_quarter
from safemail.errors import SafeMailError, UsageError
from safemail.gate import promote
from safemail.project import STAGES, Project, check_stage


def bill_command(project: Project, stage: str, quarter: str, operator: str,
                 check: bool = False, program: str | None = None) -> list[str]:
    check_stage(stage)
    if not operator.strip():
        raise UsageError("--operator must name the person who bills")
    return ansible.playbook_command(
        project, stage, "accounting-bill.yml",
        "-e", f"accounting_quarter={normalise_quarter(quarter)}",
        "-e", f"accounting_operator={operator.strip()}", *(["--check"] if check else []),
        program=program)


def cmd_bill(args: argparse.Namespace) -> int:
    project = Project.find()
    repo = project.root
    operator = args.operator or promote.default_operator()
    cmd = bill_command(project, args.stage, args.quarter, operator, args.check)
    rc = ansible.run(cmd, repo)
    if rc != 0:
        raise SafeMailError(f"billing failed (ansible-playbook exit {rc})",
                            "read the output above: a running quarter is refused")
    if not args.check:
        quarter = normalise_quarter(args.quarter)
        print(f"statement to pay from (every relay's counts summed, the cap applied to the "
              f"sum): {repo / 'reports' / 'accounting'}/{quarter}.csv; per relay (counts on "
              f"that relay only): {quarter}-<relay>.csv (participant numbers: keep them for "
              "the paying office only)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    acc = sub.add_parser("accounting", help="bill a closed quarter of the subsidy (ACC-02/03)",
                         description="The subsidy accounting from the controller. Counting, "
                                     "window and status: safemail-accounting on the relay.")
    asub = acc.add_subparsers(dest="accounting_command", metavar="ACTION")
    asub.required = True
    p = asub.add_parser("bill", help="bill a closed quarter on every relay, fetch the "
                                     "statements, anonymise the records")
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--quarter", required=True, help="YYYYQn, a quarter that is over")
    p.add_argument("--operator", default=None,
                   help="who bills (default: the sudo/login user); recorded in the admin log")
    p.add_argument("--check", action="store_true", help="check mode: bill nothing")
    p.set_defaults(func=cmd_bill)
