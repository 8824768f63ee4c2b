"""``safemail docs``: write the documentation that is generated from the code."""

from __future__ import annotations

import argparse
from pathlib import Path

from safemail.docs import generated, network
from safemail.project import STAGES, Project


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "docs",
        help="generate host list, role settings and network plan documentation",
        description=(
            "all: write hosts.md (from ansible-inventory --list), roles.md (from\n"
            "roles/*/meta/argument_specs.yml) and index.md into the output directory.\n"
            "network: the network plan (network.md, network.svg) from the flow matrix."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "part",
        nargs="?",
        choices=("all", "network"),
        default="all",
        help="all: hosts.md, roles.md, index.md; network: the network plan (network.md and "
        "network.svg) from the flow matrix (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: docs/generated; docs for network)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="inventory to document (default: production; test for network, the "
                   "stage whose inventory has hosts)")
    p.set_defaults(func=cmd_docs)


def cmd_docs(args: argparse.Namespace) -> int:
    project = Project.find()
    if args.part == "network":
        out = project.path(args.out or Path("docs"))
        for path in network.generate(project.root, out, args.stage or "test"):
            print(f"wrote {path}")
        return 0
    out = project.path(args.out or Path("docs/generated"))
    for path in generated.generate(project.root, out, stage=args.stage or "production",
                                   revision=project.revision()):
        print(f"wrote {path}")
    return 0
