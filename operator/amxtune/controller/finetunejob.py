"""FineTuneJob reconciliation: level-based, idempotent, restart-safe.

Every call reads the job and its pods afresh and moves them one step towards the spec; all
state lives in the job's status (attempt, restarts, start time, progress), so an
operator restarted mid-job continues where the previous one stopped, and names are
deterministic so nothing is created twice.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from amxtune import names
from amxtune.controller import metrics
from amxtune.controller.base import Pass, Reconciler
from amxtune.controller.kube import now_iso
from amxtune.controller.state import (
    PodView,
    apply_kstatus,
    condition,
    last_json_line,
    log_excerpt,
    parse_time,
    set_condition,
)
from amxtune.hub import check_model
from amxtune.manifest import describe_validation_error
from amxtune.render import (
    JobIdentity,
    RenderError,
    output_path,
    rank_layout,
    render_finetunejob,
)
from amxtune.render.inferencejob import inference_job_for
from amxtune_api.events import (
    EVENT_COMPLETED,
    EVENT_PROGRESS,
    EVENT_STARTED,
    EXIT_NODE_LACKS_AMX,
    INPUT_ERROR_LINE,
    NODE_LACKS_AMX,
    TrainingCompleted,
    TrainingProgress,
    TrainingStarted,
    last_failure,
)
from amxtune_api.finetunejob import FineTuneJobSpec, Method, Phase
from amxtune_api.training import EMBEDDINGS_FILE, LORA_FILE

log = logging.getLogger("amxtune.finetunejob")
KIND = "FineTuneJob"
LOG_HEAD_BYTES = 65536  # rank 0's "started" line comes within its first lines
# The other ranks leave the final barrier with rank 0 but their pods' Succeeded can reach the
# apiserver seconds later: they get this long to exit by themselves (keeping their logs and
# exit codes) before the operator deletes them.
WORKER_EXIT_GRACE_SECONDS = 60


def trainer_input_error(log_text: str) -> str | None:
    """The trainer's one-line input error in a log, if the worker died of one."""
    found = INPUT_ERROR_LINE.findall(log_text)
    return found[-1].strip() if found else None


def current_attempt(status: dict) -> int:
    """The workers' attempt number (jobs started by older operators counted it in restarts)."""
    return int(status.get("attempt", status.get("restarts", 0)))


class FineTuneJobController(Reconciler):
    kind = KIND

    def _step(self, run: Pass) -> None:
        status = run.status
        phase = status.get("phase")
        started = phase not in (None, Phase.Pending)
        try:
            spec = FineTuneJobSpec.model_validate(run.body["spec"])
        except ValidationError as error:
            message = describe_validation_error(error)
            return self._fail(run, "InvalidSpec", message) if started else self._block(
                run, "InvalidSpec", message
            )
        job = JobIdentity.from_body(run.body, KIND)
        if phase in (Phase.Succeeded, Phase.Failed):
            self._stop_workers(job, keep_finished=True)
            return None
        if not started and not self._start(run, job, spec):
            return None
        if spec.suspend:
            return self._suspend(run, job)
        if status.get("phase") == Phase.Suspended:
            status["phase"] = Phase.Running
            run.event("Normal", "Resumed", "resuming from the latest checkpoint")
        deadline = spec.active_deadline_seconds
        started_at = parse_time(status.get("startTime"))
        if deadline and started_at and (run.now - started_at).total_seconds() > deadline:
            self._stop_workers(job)
            return self._fail(
                run, "DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds "
                f"({deadline} s)"
            )
        if status.get("phase") == Phase.Exporting:
            return self._exporting(run, job, spec)
        return self._running(run, job, spec)

    def _start(self, run: Pass, job: JobIdentity, spec: FineTuneJobSpec) -> bool:
        """Pending -> Running: check what the spec refers to, then create the shared objects."""
        problem = self._preflight(job, spec)
        if problem:
            self._block(run, *problem)
            return False
        try:
            objects = render_finetunejob(job, spec, self.settings, attempt=0)
        except RenderError as error:
            self._block(run, "InvalidSpec", str(error))
            return False
        if objects.output_claim is not None and self.kube.create(objects.output_claim):
            run.event("Normal", "OutputVolumeCreated",
                      f"created PersistentVolumeClaim {objects.output_claim_name} (kept after "
                      "the job is deleted)")
        self.kube.create(objects.config_map)
        self.kube.create(objects.service)
        run.status.update(
            phase=Phase.Running,
            startTime=now_iso(run.now),
            layout=rank_layout(spec).status(spec),
            restarts=run.status.get("restarts", 0),
            attempt=current_attempt(run.status),
            outputs={"claimName": objects.output_claim_name, "path": output_path(job, spec)},
        )
        set_condition(run.status, "Stalled", False, "NotStalled", "", run.now)
        return True

    def _preflight(self, job: JobIdentity, spec: FineTuneJobSpec) -> tuple[str, str] | None:
        """What only the cluster (and the hub) can tell: referenced Secrets, claims and
        ConfigMaps exist, and so does the base model when the hub can say."""
        ns = job.namespace
        ref = spec.model.token_secret_ref
        if ref is not None:
            secret = self.kube.read("Secret", ns, ref.name)
            if secret is None:
                return "SecretNotFound", (
                    f"spec.model.tokenSecretRef: Secret {ref.name!r} not found in namespace {ns}"
                )
            if ref.key not in secret["keys"]:
                return "SecretKeyNotFound", (
                    f"spec.model.tokenSecretRef: Secret {ref.name!r} has no key {ref.key!r}"
                )
        claims = []
        if spec.model.pvc is not None:
            claims.append(("spec.model.pvc", spec.model.pvc.claim_name))
        if spec.data.pvc is not None:
            claims.append(("spec.data.pvc", spec.data.pvc.claim_name))
        if spec.output.pvc.create is None:
            claims.append(("spec.output.pvc", spec.output.pvc.claim_name))
        for field_path, claim in claims:
            if self.kube.read("PersistentVolumeClaim", ns, claim) is None:
                return "VolumeNotFound", (
                    f"{field_path}: PersistentVolumeClaim {claim!r} not found in namespace {ns}"
                )
        if spec.data.config_map is not None:
            found = self.kube.read("ConfigMap", ns, spec.data.config_map.name)
            if found is None:
                return "ConfigMapNotFound", (
                    f"spec.data.configMap: ConfigMap {spec.data.config_map.name!r} not found "
                    f"in namespace {ns}"
                )
            if not (found.get("binaryData") or found.get("data")):
                return "NoTrainingImages", (
                    f"spec.data.configMap: ConfigMap {spec.data.config_map.name!r} is empty"
                )
        if spec.model.name is not None:
            return check_model(
                self.settings.hub_endpoint, spec.model.name, spec.model.revision,
                has_token=ref is not None,
            )
        return None

    def _running(self, run: Pass, job: JobIdentity, spec: FineTuneJobSpec) -> None:
        status = run.status
        attempt = current_attempt(status)
        pods = [PodView.of(p) for p in self.kube.list_pods(job.namespace, job.name, KIND)]
        current = {p.rank: p for p in pods if p.attempt == attempt}
        stale = [p for p in pods if p.attempt != attempt]
        for pod in stale:
            if not pod.deleting:
                self.kube.delete("Pod", job.namespace, pod.name)

        leader = current.get(0)
        if leader is not None and leader.phase == "Succeeded":
            exiting = sorted(p.rank for p in current.values() if not (p.finished or p.deleting))
            grace_over = (leader.finished_at is None or (run.now - leader.finished_at)
                          .total_seconds() >= WORKER_EXIT_GRACE_SECONDS)
            if exiting and not grace_over:
                self._waiting(run, "WorkersExiting", "training finished; waiting for rank(s) "
                              f"{', '.join(map(str, exiting))} to exit")
                return None
            return self._trained(run, job, spec, leader)
        lost = self._lost_workers(status, spec, current)
        # a pod being deleted ends by the SIGTERM it got (exit 143 on a real kubelet): it is
        # lost or suspended, not failed
        failed = sorted((p for p in current.values()
                         if p.phase == "Failed" and not p.disrupted and not p.deleting),
                        key=lambda p: p.rank)
        if lost:  # the others stop or fail because of it: not a failure of the job
            return self._workers_lost(run, lost)
        if failed:
            return self._worker_failed(run, job, spec, failed[0])
        if stale:
            self._waiting(run, "Restarting", "waiting for the previous workers to stop")
            return None

        objects = render_finetunejob(job, spec, self.settings, attempt=attempt,
                                     excluded_nodes=status.get("excludedNodes") or [])
        created = [pod for pod in objects.pods if pod["metadata"]["name"] not in
                   {p.name for p in current.values()} and self.kube.create(pod)]
        if created:
            run.event("Normal", "WorkersCreated",
                      f"created {len(created)} worker pod(s) for attempt {attempt}: "
                      f"{spec.workers.nodes} x {rank_layout(spec).ranks_per_node} ranks")
        # (a pod of the same name still terminating, e.g. after a quick resume, is not one)
        if sum(not p.deleting for p in current.values()) + len(created) == len(objects.pods):
            status["podsCreatedForAttempt"] = attempt
        self._observe_workers(run, job, spec, list(current.values()))
        self._read_progress(run, job, leader, spec)

    def _observe_workers(
        self, run: Pass, job: JobIdentity, spec: FineTuneJobSpec, pods: list[PodView]
    ) -> None:
        status = run.status
        total = spec.workers.nodes
        ready = sum(p.ready for p in pods)
        status["workers"] = {"ready": ready, "total": total, "display": f"{ready}/{total}"}
        unschedulable = [p for p in pods if p.unschedulable]
        if unschedulable:
            pod = unschedulable[0]
            message = f"{pod.name} cannot be scheduled: {pod.unschedulable}"
            if status.get("excludedNodes"):
                message += (" (not on " + ", ".join(status["excludedNodes"]) +
                            ": their CPUs lacked AMX)")
            before = condition(status, "WorkersReady")
            if not before or before["reason"] != "Unschedulable":
                run.event("Warning", "Unschedulable", message)
            set_condition(status, "WorkersReady", False, "Unschedulable", message, run.now)
            timeout = spec.workers.scheduling_timeout_seconds
            since = min((p.created for p in unschedulable if p.created), default=run.now)
            if timeout and (run.now - since).total_seconds() > timeout:
                self._stop_workers(job)
                self._fail(run, "Unschedulable",
                           f"{message} (for more than schedulingTimeoutSeconds={timeout})")
                return
            apply_kstatus(status, "Unschedulable", message, run.now)
            return
        if ready == total:
            set_condition(status, "WorkersReady", True, "AllReady", f"{ready}/{total} ready",
                          run.now)
            set_condition(status, "Training", True, "Training", "ranks are training", run.now)
            apply_kstatus(status, "Training", f"training on {total} worker(s)", run.now)
        else:
            set_condition(status, "WorkersReady", False, "Starting",
                          f"{ready}/{total} worker pods ready", run.now)
            apply_kstatus(status, "Starting", f"{ready}/{total} worker pods ready", run.now)

    def _read_progress(
        self, run: Pass, job: JobIdentity, leader: PodView | None, spec: FineTuneJobSpec
    ) -> None:
        """Rank 0's latest JSON progress line, read from its log at most every few seconds;
        once per attempt also its "started" line (CPU, precision, notices)."""
        if leader is None or leader.phase != "Running":
            return
        attempt = current_attempt(run.status)
        whole_log = None  # while the log is short, one read serves both lines
        if (run.status.get("trainer") or {}).get("attempt") != attempt:
            head = self.kube.log_head(job.namespace, leader.name, LOG_HEAD_BYTES)
            whole_log = head if len(head.encode()) < LOG_HEAD_BYTES else None
            started = TrainingStarted.read(last_json_line(head, EVENT_STARTED))
            if started is not None:
                self._set_trainer_report(run, started, attempt, leader)
        progress = run.status.get("progress") or {}
        last = parse_time(progress.get("updated"))
        if last and (run.now - last).total_seconds() < self.settings.progress_interval_seconds:
            return
        text = whole_log if whole_log is not None else self.kube.log_tail(
            job.namespace, leader.name, 50)
        record = TrainingProgress.read(last_json_line(text, EVENT_PROGRESS))
        if record is None:
            return
        self._set_progress(run, record)

    def _set_trainer_report(self, run: Pass, started: TrainingStarted, attempt: int,
                            leader: PodView) -> None:
        report: dict = {"attempt": attempt, "node": leader.node, "cpu": started.cpu,
                        "cpuClass": started.cpu_class, "mixedPrecision": started.precision,
                        "precisionReason": started.precision_reason,
                        "notices": list(started.notices)}
        run.status["trainer"] = {k: v for k, v in report.items() if v is not None}

    def _set_progress(self, run: Pass, record: TrainingProgress) -> None:
        progress = {
            "step": record.step,
            "maxSteps": record.max_steps,
            "display": f"{record.step}/{record.max_steps}",
            "updated": now_iso(run.now),
        }
        for value, target in ((record.loss, "loss"), (record.lr, "learningRate"),
                              (record.samples_per_second, "samplesPerSecond"),
                              (record.eta_seconds, "etaSeconds")):
            if value is not None:
                progress[target] = round(float(value), 6)
        run.status["progress"] = progress

    def _trained(
        self, run: Pass, job: JobIdentity, spec: FineTuneJobSpec, leader: PodView
    ) -> None:
        status = run.status
        final = TrainingCompleted.read(last_json_line(
            self.kube.log_tail(job.namespace, leader.name, 50), EVENT_COMPLETED,
        )) or TrainingCompleted()
        max_steps = spec.training.max_train_steps
        step = final.steps if final.steps is not None else max_steps
        self._set_progress(run, TrainingProgress(step=step, max_steps=max_steps,
                                                 loss=final.final_loss))
        outputs = status.setdefault("outputs", {})
        base = outputs.get("path") or output_path(job, spec)
        if spec.method == Method.lora:
            outputs["lora"] = f"{base}/{LORA_FILE}"
        else:
            outputs["embeddings"] = f"{base}/{EMBEDDINGS_FILE}"
        if spec.training.save_as_full_pipeline:
            outputs["pipeline"] = f"{base}/pipeline"
        status["workers"] = {"ready": 0, "total": spec.workers.nodes,
                             "display": f"0/{spec.workers.nodes}"}
        set_condition(status, "Training", False, "Completed", "training finished", run.now)
        set_condition(status, "WorkersReady", False, "Completed", "workers finished", run.now)
        self._stop_workers(job, keep_finished=True)
        if spec.export is not None:
            body = inference_job_for(job, spec, outputs.get("claimName") or
                                     names.output_claim(job.name, spec.output.pvc.claim_name),
                                     base)
            if self.kube.create(body):
                run.event("Normal", "ExportStarted",
                          f"created InferenceJob {body['metadata']['name']} to export to "
                          "OpenVINO and render samples")
            outputs["inferenceJob"] = body["metadata"]["name"]
            status["phase"] = Phase.Exporting
            set_condition(status, "Exported", False, "Exporting", "export in progress", run.now)
            apply_kstatus(status, "Exporting", "training finished; exporting", run.now)
            return
        self._succeed(run, "training finished; results in "
                      f"{outputs.get('claimName')}:{base}")

    def _exporting(self, run: Pass, job: JobIdentity, spec: FineTuneJobSpec) -> None:
        name = names.inference_job(job.name)
        child = self.kube.get_job("InferenceJob", job.namespace, name)
        if child is None:  # deleted by someone, or creation was interrupted: make it again
            assert spec.export is not None
            self.kube.create(inference_job_for(job, spec, run.status["outputs"]["claimName"],
                                               run.status["outputs"].get("path")))
            return
        child_status = child.get("status") or {}
        phase = child_status.get("phase")
        outputs = run.status.setdefault("outputs", {})
        if phase == Phase.Succeeded:
            outputs["openvino"] = child_status.get("exportedModel")
            outputs["samples"] = child_status.get("grid")
            set_condition(run.status, "Exported", True, "Exported",
                          f"InferenceJob {name} succeeded", run.now)
            self._succeed(run, f"trained and exported; samples in {outputs.get('samples')}")
        elif phase == Phase.Failed:
            message = child_status.get("message") or "the export failed"
            set_condition(run.status, "Exported", False, "ExportFailed", message, run.now)
            self._fail(run, "ExportFailed", f"InferenceJob {name}: {message}")

    def _worker_failed(
        self, run: Pass, job: JobIdentity, spec: FineTuneJobSpec, pod: PodView,
    ) -> None:
        status = run.status
        attempt = current_attempt(status)
        log_text = self.kube.log_tail(job.namespace, pod.name, 40)
        what = pod.describe_exit()
        failure = last_failure(log_text)
        if failure:  # the trainer said what went wrong in one line: quote that
            run.event("Warning", "WorkerFailed", f"{what}: {failure}")
        else:
            tail = log_excerpt(log_text)
            run.event("Warning", "WorkerFailed",
                      what + (f"; last log lines:\n{tail}" if tail else ""))
        # The others stop in the next pass, as stale pods of the old attempt: the new attempt
        # is recorded first, so an operator killed in between cannot count this failure twice
        # nor take the stopping pods for lost ones.
        rejected = trainer_input_error(log_text)
        if rejected:  # bad input fails the same way on every attempt: do not restart
            self._fail(run, "InvalidInput", f"{what}: {rejected}")
            return
        lacks_amx = pod.exit_code == EXIT_NODE_LACKS_AMX or (
            failure is not None and f": {NODE_LACKS_AMX}: " in failure)
        excluded = list(status.get("excludedNodes") or [])
        if lacks_amx and pod.node and pod.node not in excluded:
            # The node's labels promised AMX: move away from it without spending a restart.
            excluded.append(pod.node)
            status["excludedNodes"] = excluded
            status["attempt"] = attempt + 1
            message = (f"{pod.name} ran on node {pod.node}, which is labelled as an AMX node "
                       f"but whose CPU has no AMX; {pod.node} is not used again for this job "
                       "(fix its labels, e.g. Node Feature Discovery's)")
            detail = failure.split(f": {NODE_LACKS_AMX}: ", 1)[-1] if failure else ""
            run.event("Warning", "NodeLacksAmx", message + (f": {detail}" if detail else ""))
            set_condition(status, "WorkersReady", False, "NodeLacksAmx", message, run.now)
            apply_kstatus(status, "NodeLacksAmx", message, run.now)
            return
        restarts = status.get("restarts", 0)
        if restarts < spec.backoff_limit:
            status["restarts"] = restarts + 1
            status["attempt"] = attempt + 1
            metrics.RESTARTS.labels(KIND).inc()
            run.event("Normal", "Restarting",
                      f"restarting all workers (restart {restarts + 1} of {spec.backoff_limit}); "
                      "training resumes from the latest checkpoint")
            set_condition(status, "WorkersReady", False, "Restarting", what, run.now)
            apply_kstatus(status, "Restarting", f"{what}; restarting", run.now)
            return
        self._fail(
            run, "BackoffLimitExceeded",
            f"{what}; gave up after {restarts} restart(s) (backoffLimit {spec.backoff_limit})",
        )

    @staticmethod
    def _lost_workers(status: dict, spec: FineTuneJobSpec,
                      current: dict[int, PodView]) -> list[str]:
        """Workers of this attempt that are gone or going though none of them failed: deleted,
        evicted, preempted. Only once all of the attempt's pods existed (so not the pods a
        suspend is still deleting when the job resumes)."""
        if status.get("podsCreatedForAttempt") != current_attempt(status):
            return []
        missing = [f"rank {rank}" for rank in range(spec.workers.nodes) if rank not in current]
        return missing + [pod.name for pod in current.values() if pod.phase != "Succeeded"
                          and (pod.disrupted or pod.deleting)]

    def _workers_lost(self, run: Pass, lost: list[str]) -> None:
        """The group cannot go on without a rank: restart it from the latest checkpoint (the
        lost rank saved one on SIGTERM when it could), not counted against backoffLimit."""
        status = run.status  # the others stop in the next pass, as stale pods
        status["attempt"] = current_attempt(status) + 1
        status["disruptions"] = status.get("disruptions", 0) + 1
        status.pop("podsCreatedForAttempt", None)
        message = (f"worker {', '.join(lost)} lost (pod deleted, evicted or preempted); "
                   "restarting all workers from the latest checkpoint (not counted against "
                   "backoffLimit)")
        run.event("Warning", "WorkersLost", message)
        set_condition(status, "WorkersReady", False, "WorkersLost", message, run.now)
        apply_kstatus(status, "WorkersLost", message, run.now)

    def _suspend(self, run: Pass, job: JobIdentity) -> None:
        self._stop_workers(job)
        run.status.pop("podsCreatedForAttempt", None)  # resuming recreates them: not lost
        if run.status.get("phase") != Phase.Suspended:
            run.status["phase"] = Phase.Suspended
            run.event("Normal", "Suspended", "workers deleted; set suspend: false to resume")
        workers = run.status.get("workers") or {}
        total = workers.get("total", 0)
        run.status["workers"] = {"ready": 0, "total": total, "display": f"0/{total}"}
        set_condition(run.status, "WorkersReady", False, "Suspended", "suspended", run.now)
        apply_kstatus(run.status, "Suspended", "suspended", run.now)

    def _fail(self, run: Pass, reason: str, message: str) -> None:
        set_condition(run.status, "Training", False, reason, message, run.now)
        super()._fail(run, reason, message)
