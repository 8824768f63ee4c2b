"""``safemail docs``: write the documentation that is generated from the code."""

from __future__ import annotations

import argparse
from pathlib import Path

from safemail.docs import generated, network, readmes
from safemail.errors import UsageError
from safemail.project import STAGES, Project


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "docs",
        help="generate host list, role settings and network plan documentation",
        description=(
            "all: write hosts.md (from ansible-inventory --list), roles.md (from\n"
            "roles/*/meta/argument_specs.yml) and index.md into the output directory.\n"
            "network: the network plan (network.md, network.svg) from the flow matrix.\n"
            "readmes: the settings part of every roles/<role>/README.md from the role's\n"
            "meta/argument_specs.yml (text outside the generated part is kept)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "part",
        nargs="?",
        choices=("all", "network", "readmes"),
        default="all",
        help="all: hosts.md, roles.md, index.md; network: the network plan (network.md and "
        "network.svg) from the flow matrix; readmes: roles/*/README.md (default: %(default)s)",
    )
    p.add_argument("--check", action="store_true",
                   help="readmes: write nothing, exit 1 and name every README that is stale")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: docs/generated; docs for network)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="inventory to document (default: production; test for network, the "
                   "stage whose inventory has hosts)")
    p.set_defaults(func=cmd_docs)


def cmd_docs(args: argparse.Namespace) -> int:
    project = Project.find()
    if args.check and args.part != "readmes":
        raise UsageError("--check goes with `safemail docs readmes`")
    if args.part == "readmes":
        if args.out or args.stage:
            raise UsageError("readmes are written into roles/: --out and --stage do not apply")
        if args.check:
            stale = [r.path for r in readmes.readmes(project.roles) if not r.current]
            for path in stale:
                print(f"stale: {path.relative_to(project.root)}")
            return 1 if stale else 0
        for path in readmes.write(project.roles):
            print(f"wrote {path}")
        return 0
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
