"""Subsidy accounting of SafeMail (ACC-01..04, audit report §3.2, §3.3).

Runs on the relay, next to the Postfix log it reads. Four steps, one module each:

* :mod:`.logparse` -- Postfix log lines to deliveries (queue id, sender, recipient, time).
  Pure; the relay log is the only source, so nothing of a mail's content is ever seen.
* :mod:`.ledger` -- the SQLite ledger on the encrypted log volume: raw records per delivery
  (hour, sender and recipient participant number and specialty group; mails to oneself are
  not recorded), billing of a closed quarter (payout per participant, capped), anonymisation
  in the same transaction (participant numbers deleted, specialty groups and hours kept),
  deletion of billing statements after their retention, and the maintenance window with the
  least traffic from the anonymised records.
* :mod:`.cli` -- ``python -m safemail.accounting`` (the role installs it as
  ``safemail-accounting``): collect, counts, bill, statement, purge, window, status.
"""
