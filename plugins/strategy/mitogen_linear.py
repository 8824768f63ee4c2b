"""The `mitogen_linear` strategy (ansible.cfg): Ansible's linear strategy run over Mitogen.

Mitogen keeps one Python interpreter per host for the whole run and imports a module's code
there once; without it every task starts a new interpreter on the host and compiles Ansible's
module_utils again from the module's zip. On the lab's emulated VMs that start-up was most of
each task's 5-10 s (docs/PERFORMANCE.md: "The stage").

This file only names the class: the code is the `mitogen` package of the controller's Python
environment (pyproject.toml pins it), as in Mitogen's own strategy plugin files. Under the
default `linear` strategy (ANSIBLE_STRATEGY=linear) everything runs as before.
"""

from __future__ import annotations

import ansible_mitogen.loaders
import ansible_mitogen.strategy

Base = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, Base):
    pass
