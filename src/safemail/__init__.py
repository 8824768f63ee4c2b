"""SafeMail IaC: provisioning and verification of the SafeMail closed mail service."""

__version__ = "0.1.0"
