"""InferenceJob reconciliation: one export pod, retried up to backoffLimit."""

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
    last_json_line,
    log_excerpt,
    set_condition,
)
from amxtune.manifest import describe_validation_error
from amxtune.render import JobIdentity
from amxtune.render.inferencejob import render_inferencejob
from amxtune_api.events import EVENT_COMPLETED, ExportCompleted, last_failure
from amxtune_api.finetunejob import Phase
from amxtune_api.inferencejob import InferenceJobSpec

log = logging.getLogger("amxtune.inferencejob")
KIND = "InferenceJob"


class InferenceJobController(Reconciler):
    kind = KIND

    def _step(self, run: Pass) -> None:
        status = run.status
        if status.get("phase") in (Phase.Succeeded, Phase.Failed):
            return
        try:
            spec = InferenceJobSpec.model_validate(run.body["spec"])
        except ValidationError as error:
            return self._fail(run, "InvalidSpec", describe_validation_error(error))
        job = JobIdentity.from_body(run.body, KIND)
        if status.get("phase") is None:
            problem = self._claim_missing(job, spec)
            if problem:
                return self._block(run, "VolumeNotFound", problem)
            status.update(phase=Phase.Running, startTime=now_iso(run.now), restarts=0)
        attempt = status.get("restarts", 0)
        pods = [PodView.of(p) for p in self.kube.list_pods(job.namespace, job.name, KIND)]
        current = next((p for p in pods if p.attempt == attempt), None)
        for pod in pods:
            if pod.attempt != attempt and not pod.deleting and not pod.finished:
                self.kube.delete("Pod", job.namespace, pod.name)
        if current is None:
            if any(p.attempt != attempt and not p.deleting for p in pods):
                # same pod name per attempt: the previous pod must be gone first
                for pod in pods:
                    self.kube.delete("Pod", job.namespace, pod.name)
                return apply_kstatus(status, "Restarting", "waiting for the previous pod",
                                     run.now)
            objects = render_inferencejob(job, spec, self.settings, attempt=attempt)
            self.kube.create(objects.config_map)
            if self.kube.create(objects.pod):
                run.event("Normal", "ExportStarted",
                          f"created pod {objects.pod['metadata']['name']}: OpenVINO export "
                          f"({spec.openvino.weight_format}, {spec.openvino.width}x"
                          f"{spec.openvino.height}) and {len(spec.prompts)} prompt(s)")
            return apply_kstatus(status, "Exporting", "export pod created", run.now)
        if current.phase == "Succeeded":
            result = ExportCompleted.read(last_json_line(
                self.kube.log_tail(job.namespace, current.name, 50), EVENT_COMPLETED,
            )) or ExportCompleted()
            status.update(
                exportedModel=result.openvino,
                exportedFrom=result.source,
                weights=result.weights,
                exportCache=result.export_cache,
                exportSeconds=result.export_seconds,
                grid=result.grid,
                images=result.images,
                imagePaths=result.image_paths[:64] or None,
                secondsPerImage=result.seconds_per_image,
            )
            for key in [k for k, v in status.items() if v is None]:
                del status[key]
            set_condition(status, "Exported", True, "Exported", "OpenVINO pipeline saved",
                          run.now)
            return self._succeed(run, f"exported to {result.openvino or 'openvino/'}; "
                                 f"{result.images or 'the'} image(s) rendered")
        if current.phase == "Failed":
            log_text = self.kube.log_tail(job.namespace, current.name, 40)
            tail = log_excerpt(log_text)
            what = current.describe_exit()
            failure = last_failure(log_text)  # the trainer's own one-line message
            run.event("Warning", "ExportFailed", f"{what}: {failure}" if failure else
                      what + (f"; last log lines:\n{tail}" if tail else ""))
            if attempt < spec.backoff_limit:
                status["restarts"] = attempt + 1
                metrics.RESTARTS.labels(KIND).inc()
                run.event("Normal", "Restarting", f"retrying the export ({attempt + 1} of "
                          f"{spec.backoff_limit})")
                return apply_kstatus(status, "Restarting", what, run.now)
            last_line = failure or (tail.splitlines()[-1] if tail else "")
            return self._fail(run, "ExportFailed", what + (f": {last_line}" if last_line else ""))
        if current.unschedulable:
            return apply_kstatus(status, "Unschedulable",
                                 f"{current.name} cannot be scheduled: {current.unschedulable}",
                                 run.now)
        return apply_kstatus(status, "Exporting", f"{current.name} is {current.phase.lower()}",
                             run.now)

    def _claim_missing(self, job: JobIdentity, spec: InferenceJobSpec) -> str | None:
        claim = spec.source.pvc.claim_name
        if self.kube.read("PersistentVolumeClaim", job.namespace, claim) is None:
            return f"spec.source.pvc: PersistentVolumeClaim {claim!r} not found"
        return None


def owner_finetunejob(body: dict) -> str | None:
    """Name of the FineTuneJob that owns an object, if one does."""
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "FineTuneJob" and ref.get("apiVersion", "").startswith(names.GROUP):
            return ref["name"]
    return None
