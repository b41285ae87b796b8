"""Status bookkeeping shared by both controllers: conditions, kstatus, pod views, progress."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from amxtune import names
from amxtune.controller.kube import now_iso
from amxtune_api.finetunejob import Phase


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def set_condition(
    status: dict, type_: str, value: bool | None, reason: str, message: str, now: datetime
) -> None:
    """Set a metav1.Condition; lastTransitionTime changes only when the status value does."""
    text = {True: "True", False: "False", None: "Unknown"}[value]
    conditions = status.setdefault("conditions", [])
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != text:
                condition["lastTransitionTime"] = now_iso(now)
            condition.update(status=text, reason=reason, message=message)
            break
    else:
        conditions.append(
            {
                "type": type_,
                "status": text,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now_iso(now),
            }
        )
    generation = status.get("observedGeneration")
    for condition in conditions:
        if generation is not None:
            condition["observedGeneration"] = generation


def condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def apply_kstatus(status: dict, reason: str, message: str, now: datetime, blocked: bool = False):
    """Ready / Reconciling / Stalled as kstatus (Flux, Argo CD, `kubectl wait`) reads them."""
    phase = status.get("phase")
    done = phase == Phase.Succeeded
    stalled = phase == Phase.Failed or blocked
    reconciling = not (done or stalled or phase == Phase.Suspended)
    set_condition(status, "Ready", done, "Succeeded" if done else reason, message, now)
    set_condition(status, "Reconciling", reconciling, reason, message if reconciling else "", now)
    set_condition(status, "Stalled", stalled, reason if stalled else "NotStalled",
                  message if stalled else "", now)
    status["message"] = message


@dataclass
class PodView:
    """What the controller needs to know about one pod."""

    name: str
    rank: int
    attempt: int
    phase: str
    ready: bool
    deleting: bool
    created: datetime | None
    node: str | None = None
    unschedulable: str | None = None
    exit_code: int | None = None
    exit_reason: str | None = None
    finished_at: datetime | None = None
    disrupted: bool = False  # evicted, preempted or drained: not the workload's fault
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, pod: dict) -> PodView:
        meta, status = pod["metadata"], pod.get("status") or {}
        labels = meta.get("labels") or {}
        unschedulable = None
        for cond in status.get("conditions") or []:
            if (cond.get("type"), cond.get("status"), cond.get("reason")) == (
                "PodScheduled", "False", "Unschedulable"
            ):
                unschedulable = cond.get("message") or "no node fits the pod"
        disrupted = status.get("reason") == "Evicted" or any(
            (cond.get("type"), cond.get("status")) == ("DisruptionTarget", "True")
            for cond in status.get("conditions") or [])
        exit_code = exit_reason = finished_at = None
        containers = status.get("containerStatuses") or []
        for container in containers:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated:
                exit_code = terminated.get("exitCode")
                exit_reason = terminated.get("reason")
                finished_at = parse_time(terminated.get("finishedAt"))
        return cls(
            name=meta["name"],
            rank=int(labels.get(names.RANK_LABEL, 0)),
            attempt=int(labels.get(names.ATTEMPT_LABEL, 0)),
            phase=status.get("phase", "Pending"),
            ready=status.get("phase") == "Running"
            and bool(containers)
            and all(c.get("ready") for c in containers),
            deleting=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")),
            node=(pod.get("spec") or {}).get("nodeName"),
            unschedulable=unschedulable,
            exit_code=exit_code,
            exit_reason=exit_reason,
            finished_at=finished_at,
            disrupted=disrupted,
            raw=pod,
        )

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def describe_exit(self) -> str:
        code = "unknown" if self.exit_code is None else self.exit_code
        reason = f", {self.exit_reason}" if self.exit_reason else ""
        return f"{self.name} exited with code {code}{reason}"


def last_json_line(log: str, event: str) -> dict | None:
    """The newest `{"event": EVENT, ...}` line in a log, if any."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            return record
    return None


def log_excerpt(log: str, lines: int = 10) -> str:
    kept = [line for line in log.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)
