"""Pure functions from a job's spec to the Kubernetes objects that run it.

Shared by the controller, `amxtune render`, the local runner and the golden-file tests.
"""

from amxtune.render.common import JobIdentity, RenderError
from amxtune.render.finetunejob import (
    FineTuneJobObjects,
    output_path,
    rank_environment,
    rank_layout,
    render_finetunejob,
    trainer_config,
)

__all__ = [
    "FineTuneJobObjects",
    "JobIdentity",
    "RenderError",
    "output_path",
    "rank_environment",
    "rank_layout",
    "render_finetunejob",
    "trainer_config",
]
