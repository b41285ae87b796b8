"""What both controllers share: one pass = read, decide, write status and events once.

Reconciliation is level-based: every call reads the object and its pods afresh and moves them
one step towards the spec. All state lives in the object's status, so an operator restarted
mid-job continues where the previous one stopped.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from amxtune.controller import metrics
from amxtune.controller.kube import Kube, Refused, now_iso
from amxtune.controller.state import PodView, apply_kstatus, condition
from amxtune.render import JobIdentity
from amxtune.settings import Settings
from amxtune_api.finetunejob import Phase

log = logging.getLogger("amxtune.controller")


@dataclass
class Pass:
    """One reconciliation pass: the job as read, the status being built, events to record."""

    body: dict
    status: dict
    now: datetime
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


class Reconciler:
    """Read the object, build its next status in a Pass, write status and events once."""

    kind = ""
    def __init__(
        self, kube: Kube, settings: Settings, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))

    # --- entry point -----------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        body = self.kube.get_job(self.kind, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # deleted: the garbage collector removes what it owned
        with metrics.RECONCILE_SECONDS.labels(self.kind).time():
            run = Pass(body, copy.deepcopy(body.get("status") or {}), self.clock())
            run.status["observedGeneration"] = body["metadata"].get("generation")
            try:
                self._step(run)
            except Refused as refused:
                self._refused(run, str(refused))
            self._commit(run)

    def _commit(self, run: Pass) -> None:
        meta = run.body["metadata"]
        before = run.body.get("status") or {}
        if run.status != before:
            # a merge patch keeps keys it does not name: name the dropped ones as null
            dropped = {key: None for key in before if key not in run.status}
            self.kube.patch_status(self.kind, meta["namespace"], meta["name"],
                                   {**run.status, **dropped})
        for type_, reason, message in run.events:
            log.info("%s/%s %s: %s", meta["namespace"], meta["name"], reason, message)
            self.kube.event(run.body, type_, reason, message)

    def _step(self, run: Pass) -> None:
        raise NotImplementedError

    def _stop_workers(self, job: JobIdentity, keep_finished: bool = False) -> None:
        """Delete the job's pods (finished ones stay when asked, for their logs)."""
        for pod in self.kube.list_pods(job.namespace, job.name, self.kind):
            view = PodView.of(pod)
            if view.deleting or (keep_finished and view.finished):
                continue
            self.kube.delete("Pod", job.namespace, view.name)

    def _refused(self, run: Pass, message: str) -> None:
        """An object the spec renders is invalid to the API server: retrying cannot help.
        Before the start the job waits for a corrected spec; after it, it fails (its pods go)."""
        if run.status.get("phase") in (None, Phase.Pending):
            return self._block(run, "ObjectRefused", message)
        self._stop_workers(JobIdentity.from_body(run.body, self.kind))
        self._fail(run, "ObjectRefused", message)

    def _waiting(self, run: Pass, reason: str, message: str) -> None:
        apply_kstatus(run.status, reason, message, run.now)

    def _block(self, run: Pass, reason: str, message: str) -> None:
        """Not started and cannot start yet (missing Secret, claim, ...): Stalled, retried."""
        before = condition(run.status, "Stalled")
        if not before or before["status"] != "True" or before["reason"] != reason:
            run.event("Warning", reason, message)
        run.status["phase"] = Phase.Pending
        apply_kstatus(run.status, reason, message, run.now, blocked=True)

    def _fail(self, run: Pass, reason: str, message: str) -> None:
        run.status["phase"] = Phase.Failed
        run.status["completionTime"] = now_iso(run.now)
        apply_kstatus(run.status, reason, message, run.now)
        run.event("Warning", "Failed", f"{reason}: {message}")

    def _succeed(self, run: Pass, message: str) -> None:
        run.status["phase"] = Phase.Succeeded
        run.status["completionTime"] = now_iso(run.now)
        apply_kstatus(run.status, "Succeeded", message, run.now)
        run.event("Normal", "Succeeded", message)
