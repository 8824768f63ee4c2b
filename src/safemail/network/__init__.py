"""The SafeMail flow matrix: the one table of allowed network flows (docs/firewall.md).

``matrix`` reads and checks it and resolves it to per-host rules and probes; ``plan`` renders
it as the network plan (Markdown table and SVG picture) for docs/.
"""
