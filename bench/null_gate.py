"""The third arm of bench_smime_gate.py: the S/MIME gate's own milter doing no classification.

Runs ON the relay with the runtime Python (/opt/safemail/venv/bin/python), started by the
benchmark as a transient systemd unit under the gate's account. It is the production milter
(``safemail.smime.milter``: pymilter, the same glue class, the same callbacks, the same
in-flight slots, one thread per connection) with :class:`~safemail.smime.milter.MessageGate`
replaced by one that ignores what it is given and accepts. The difference between this arm and
no milter at all is the cost of the milter protocol; the difference between this arm and the
real gate is the cost of the classifier and the header rules.

Benchmark only: nothing in the roles starts it, and it listens only on the socket it is given.

Usage: python null_gate.py unix:/run/safemail-gate/bench-null.sock
"""

from __future__ import annotations

import logging
import sys

from safemail.smime import milter


class NullGate(milter.MessageGate):
    """Takes every callback, keeps nothing, decides ACCEPT."""

    def add_header(self, name: str | bytes, value: str | bytes) -> None:
        del name, value

    def end_of_headers(self) -> None:
        pass

    def add_body(self, chunk: bytes) -> None:
        del chunk

    def decide(self) -> milter.Decision:
        return milter.Decision(milter.Action.ACCEPT, "bench_null")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("unix:"):
        print(__doc__.rsplit("Usage: ", 1)[-1].strip(), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="null-gate: %(message)s")
    milter.MessageGate = NullGate  # type: ignore[misc]  # _milter_class builds this per connection
    milter.run(argv[0], milter.GateConfig())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
