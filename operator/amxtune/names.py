"""Deterministic names and labels of everything a job creates (handlers stay idempotent)."""

from __future__ import annotations

GROUP = "amxtune.io"
JOB_LABEL = f"{GROUP}/job"
RANK_LABEL = f"{GROUP}/rank"
ATTEMPT_LABEL = f"{GROUP}/attempt"
KIND_LABEL = f"{GROUP}/kind"
MANAGED_BY = "amxtune-operator"

# "NAME-worker-255" must stay a DNS label (63 characters): pods use it as their host name.
MAX_JOB_NAME = 48
# An InferenceJob's name is a label value of its pod (at most 63 characters).
MAX_INFERENCE_JOB_NAME = 63


def config_map(job: str) -> str:
    return f"{job}-config"


def service(job: str) -> str:
    return f"{job}-workers"


def worker(job: str, rank: int) -> str:
    return f"{job}-worker-{rank}"


def output_claim(job: str, claim_name: str | None) -> str:
    return claim_name or f"{job}-output"


def inference_job(job: str) -> str:
    return f"{job}-export"


def export_pod(inference_job_name: str) -> str:
    return f"{inference_job_name}-runner"


def worker_dns(job: str, namespace: str, rank: int, cluster_domain: str = "cluster.local") -> str:
    return f"{worker(job, rank)}.{service(job)}.{namespace}.svc.{cluster_domain}"


def labels(job: str, component: str, kind: str = "FineTuneJob") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "amxtune",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "amxtune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_LABEL: job,
        KIND_LABEL: kind.lower(),
    }
