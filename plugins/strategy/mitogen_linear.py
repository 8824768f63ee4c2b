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

import ansible_mitogen.affinity
import ansible_mitogen.connection
import ansible_mitogen.loaders
import ansible_mitogen.strategy
import ansible_mitogen.utils.unsafe

Base = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)

# Ad-hoc commands on localhost (`ansible localhost -m ...`, the local connection) failed with
# "cannot unpickle ... _AnsibleTaggedStr": ansible.cfg's `playbook_dir` becomes the loader's
# base directory, ansible-core 2.19 keeps it as a tagged string, and Mitogen sends it to the
# local target as the module's working directory without casting it (it casts everything
# else). Playbooks were not affected (their base directory is the playbook's, a plain str).
_on_action_run = ansible_mitogen.connection.Connection.on_action_run


def _on_action_run_plain_basedir(self, task_vars, delegate_to_hostname, loader_basedir):
    return _on_action_run(self, task_vars, delegate_to_hostname,
                          ansible_mitogen.utils.unsafe.cast(loader_basedir))


ansible_mitogen.connection.Connection.on_action_run = _on_action_run_plain_basedir


# Mitogen pins its processes to CPUs. On this project's 2-core machines that put the connection
# multiplexer on CPU 0 and everything else, every subprocess included (ssh, and the commands a
# playbook runs on the controller), on CPU 1. The commands inherit the pin: Molecule's create
# (`safemail lab up`) put every lab VM and container on one core and its verify ran the suite
# there (molecule-stage 40 min, half the CPU idle with 5-12 runnable tasks;
# docs/PERFORMANCE.md). The base policy does nothing: the kernel's scheduler places them.
ansible_mitogen.affinity.policy = ansible_mitogen.affinity.Policy()


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, Base):
    pass
