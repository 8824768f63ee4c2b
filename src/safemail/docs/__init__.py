"""Documentation generated from the code: ``safemail docs``.

- :mod:`safemail.docs.generated`: docs/generated/ (hosts.md, roles.md, index.md);
- :mod:`safemail.docs.readmes`: roles/<role>/README.md from each role's argument specs;
- :mod:`safemail.docs.network`: the network plan (docs/network.md, docs/network.svg);
- :mod:`safemail.docs.cli`: the ``safemail docs`` command.
"""
