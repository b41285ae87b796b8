"""Operator-wide settings (from the environment the Helm chart sets), shared by render and CLI."""

from __future__ import annotations

import os

from pydantic import Field

from amxtune_api.base import ApiModel
from amxtune_api.finetunejob import AMX_LABELS

DEFAULT_TRAINER_IMAGE = "ghcr.io/amxtune/amxtune-trainer:0.1.0"


class Settings(ApiModel):
    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, min_length=1)
    # Where the trainer image installs the libraries the ranks preload (trainer_image/Dockerfile).
    tcmalloc_path: str = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"
    jemalloc_path: str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    iomp5_path: str = "/opt/amxtune/venv/lib/libiomp5.so"
    cluster_domain: str = "cluster.local"
    # Node Feature Discovery's labels unless the cluster marks AMX nodes otherwise.
    amx_node_labels: list[str] = Field(default_factory=lambda: list(AMX_LABELS), min_length=1)
    # UID/GID of the non-root user in the trainer image; fsGroup makes the output volume writable.
    run_as_user: int = 1000
    progress_interval_seconds: float = Field(default=5.0, gt=0)
    # Periodic passes (each a few requests: the job, its pods, rank 0's log) over all running
    # jobs together: with more running jobs than this many per progress interval, each job's
    # period grows instead of the operator's request rate (docs/performance.md, "At scale").
    periodic_reconciles_per_second: float = Field(default=4.0, gt=0)
    # Passes wait on the apiserver more than they compute: at 1000 new jobs on 2 cores, 12
    # workers bound every pod 102 s after the last create, 4 workers 166 s.
    reconcile_workers: int = Field(default=12, ge=1)
    # Asked whether spec.model.name exists before pods are created; "" skips the question.
    hub_endpoint: str = "https://huggingface.co"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """AMXTUNE_<FIELD> variables override the defaults; lists are comma-separated."""
        environ = os.environ if environ is None else environ
        values = {}
        for name in cls.model_fields:
            key = f"AMXTUNE_{name.upper()}"
            if key in environ:
                raw = environ[key]
                is_list = cls.model_fields[name].annotation == list[str]
                values[name] = [v.strip() for v in raw.split(",") if v.strip()] if is_list else raw
        return cls.model_validate(values)
