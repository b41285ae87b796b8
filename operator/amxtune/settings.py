"""Operator-wide settings (from the environment the Helm chart sets), shared by render and CLI."""

from __future__ import annotations

import os

from pydantic import Field

from amxtune.api.base import ApiModel

DEFAULT_TRAINER_IMAGE = "ghcr.io/amxtune/amxtune-trainer:0.1.0"


class Settings(ApiModel):
    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, min_length=1)
    # Where the trainer image installs the libraries the ranks preload (trainer_image/Dockerfile).
    tcmalloc_path: str = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"
    jemalloc_path: str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    iomp5_path: str = "/opt/amxtune/venv/lib/libiomp5.so"
    cluster_domain: str = "cluster.local"
    # UID/GID of the non-root user in the trainer image; fsGroup makes the output volume writable.
    run_as_user: int = 1000
    progress_interval_seconds: float = Field(default=5.0, gt=0)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """AMXTUNE_TRAINER_IMAGE, AMXTUNE_TCMALLOC_PATH, ... override the defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for name in cls.model_fields:
            key = f"AMXTUNE_{name.upper()}"
            if key in environ:
                values[name] = environ[key]
        return cls.model_validate(values)
