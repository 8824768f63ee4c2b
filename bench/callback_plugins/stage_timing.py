"""Ansible callback for bench/bench_stage.py: where a playbook run's time goes.

For every task result it records the host, the role (or "-" for a play's own tasks), the task
name and the seconds from the task's start to that host's result (under the linear strategy a
host's share of a task). At the end it writes one JSON file (path from the environment variable
SAFEMAIL_TIMING_OUT) with the per-(host, role) sums, the per-role totals of the slowest host
and every task's row. It prints nothing and changes nothing else in the run.

Enable: ANSIBLE_CALLBACK_PLUGINS=bench/callback_plugins ANSIBLE_CALLBACKS_ENABLED=stage_timing
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: stage_timing
    type: aggregate
    short_description: per host, role and task timing as JSON (SafeMail bench)
    description:
      - Writes the seconds each host spent in each task and role to SAFEMAIL_TIMING_OUT.
    requirements:
      - enable in callbacks_enabled
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "stage_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._task_start: dict[str, float] = {}
        self._task_role: dict[str, str] = {}
        self._task_name: dict[str, str] = {}
        self._rows: list[dict] = []
        self._run_start = time.monotonic()

    def _start(self, task) -> None:
        uid = task._uuid
        self._task_start[uid] = time.monotonic()
        role = getattr(task, "_role", None)
        self._task_role[uid] = role.get_name() if role is not None else "-"
        self._task_name[uid] = task.get_name()

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start(task)

    def _record(self, result, status: str) -> None:
        uid = result._task._uuid
        start = self._task_start.get(uid)
        if start is None:
            return
        self._rows.append({
            "host": result._host.get_name(),
            "role": self._task_role.get(uid, "-"),
            "task": self._task_name.get(uid, ""),
            "status": status,
            "seconds": round(time.monotonic() - start, 3),
        })

    def v2_runner_on_ok(self, result):
        self._record(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        out = os.environ.get("SAFEMAIL_TIMING_OUT")
        if not out:
            return
        per_host_role: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        tasks_run: dict[str, int] = defaultdict(int)
        for row in self._rows:
            per_host_role[row["host"]][row["role"]] += row["seconds"]
            if row["status"] != "skipped":
                tasks_run[row["host"]] += 1
        data = {
            "wall_seconds": round(time.monotonic() - self._run_start, 3),
            "per_host_role": {h: {r: round(s, 1) for r, s in sorted(roles.items())}
                              for h, roles in sorted(per_host_role.items())},
            "per_host_total": {h: round(sum(roles.values()), 1)
                               for h, roles in sorted(per_host_role.items())},
            "tasks_run": dict(sorted(tasks_run.items())),
            "rows": self._rows,
        }
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
