"""Lookup plugin: the flows the listed roles export, read by the project's one matrix loader.

The flow matrix is safemail_site_flows (inventory) plus each role's ``<role>_firewall_flows``
(its defaults). ``safemail.network.matrix.role_exports`` reads those exports for the docs,
the probes and the plan; this plugin makes Ansible read them with the same code, so the
firewall role, the verify probes and ``safemail docs network`` cannot disagree (a listed role
without an export is an error in all of them).
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: safemail_role_flows
short_description: the firewall flows the listed roles export
description:
  - Reads C(<role>_firewall_flows) from C(roles/<role>/defaults/main.yml) of each listed role
    (in the first directory of the configured roles path) with the project's matrix loader,
    safemail.network.matrix.role_exports, and returns the flows in role order.
  - Fails naming the role when a listed role does not exist or exports no flows variable.
options:
  _terms:
    description: role names (one list, as in C(safemail_flow_roles)).
    required: true
"""

EXAMPLES = r"""
flows: "{{ safemail_site_flows + query('safemail_role_flows', safemail_flow_roles) }}"
"""

RETURN = r"""
_list:
  description: flow mappings with from, to, proto, port, purpose.
  type: list
  elements: dict
"""

import sys  # noqa: E402 - after the plugin documentation, as Ansible's own plugins do
from pathlib import Path  # noqa: E402

from ansible import constants as C  # noqa: E402
from ansible.errors import AnsibleLookupError  # noqa: E402
from ansible.module_utils.common.text.converters import to_native  # noqa: E402
from ansible.plugins.lookup import LookupBase  # noqa: E402

# The loader of this checkout (plugins/lookup/ -> src/), also when another checkout's package
# is the one installed in the Python that runs Ansible.
_SRC = str(Path(__file__).resolve().parents[2] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        from safemail.network.matrix import MatrixError, role_exports

        roles = []
        for term in terms:
            roles.extend(term if isinstance(term, list) else [term])
        roles_path = C.config.get_config_value("DEFAULT_ROLES_PATH")
        try:
            flows = role_exports(Path(roles_path[0]), [str(r) for r in roles])
        except MatrixError as exc:
            raise AnsibleLookupError(f"safemail_role_flows: {to_native(exc)}") from exc
        return [{k: v for k, v in flow.items() if k != "_origin"} for flow in flows]
