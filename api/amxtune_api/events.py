"""What a trainer process tells whoever started it (the operator, `amxtune run`), besides files.

Exit codes say what kind of failure it was; the pod's container status carries them to the
operator. JSON lines on stdout (rank 0 only) carry progress; one-line messages on stderr carry
failures. Both sides import these names, so the contract is written once.
"""

from __future__ import annotations

import json
import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError

# Exit codes of `amxtune-train` (and of `amxtune-train launch`, which passes on the first
# failing rank's code).
EXIT_FAILED = 1  # anything unexpected: restarting may help
EXIT_INPUT_ERROR = 2  # bad options, data or model: every attempt would fail the same way
EXIT_NODE_LACKS_AMX = 3  # workers.requireAmx, but this node's CPU has no AMX: not here again

# JSON events, one object per line, {"event": NAME, ...}.
EVENT_STARTED = "started"  # once, before the model loads: CPU, precision, fast paths, notices
EVENT_PROGRESS = "progress"  # every loggingSteps
EVENT_COMPLETED = "completed"  # once, after the outputs are written
EVENT_STOPPED = "stopped"  # told to stop (SIGTERM/SIGINT): the step and checkpoint it saved

# The failure lines, as `amxtune-train SUBCOMMAND: KIND: MESSAGE`.
INPUT_ERROR = "error"
NODE_LACKS_AMX = "node lacks AMX"
RANK_FAILED = re.compile(r"rank \d+ failed")
FAILURE_LINE = re.compile(
    r"^amxtune-train [\w-]+: (?:error|node lacks AMX|rank \d+ failed): .+$", re.MULTILINE
)
INPUT_ERROR_LINE = re.compile(r"^amxtune-train [\w-]+: error: (.+)$", re.MULTILINE)


def failure_line(command: str, kind: str, message: str) -> str:
    return f"amxtune-train {command}: {kind}: {message}"


def last_failure(log_text: str) -> str | None:
    """The newest one-line failure a trainer process printed, if any."""
    found = FAILURE_LINE.findall(log_text)
    return found[-1].strip() if found else None


class Event(BaseModel):
    """One JSON line. Keys are snake_case, as the trainer has always written them; a reader
    ignores keys it does not know, so a newer trainer may add some."""

    model_config = ConfigDict(extra="ignore")

    event: str

    def line(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True),
                          separators=(", ", ": "))

    @classmethod
    def read(cls, record: dict | None) -> Self | None:
        """The event from a parsed line, or None when there is none or it does not fit."""
        if not isinstance(record, dict) or record.get("event") != cls.model_fields[
                "event"].default:
            return None
        try:
            return cls.model_validate(record)
        except ValidationError:
            return None


class TrainingStarted(Event):
    """Rank 0, once inputs are known good: the CPU, and the precision and kernels chosen."""

    event: Literal["started"] = EVENT_STARTED
    method: str | None = None
    world_size: int | None = None
    cpu: str | None = None
    cpu_class: str | None = None
    other_cpus: list[str] = []
    precision: str | None = None
    precision_reason: str | None = None
    packed_convolutions: bool | None = None
    channels_last: bool | None = None
    torch_compile: bool | None = None
    attention: str | None = None
    notices: list[str] = []


class TrainingProgress(Event):
    event: Literal["progress"] = EVENT_PROGRESS
    step: int
    max_steps: int
    loss: float | None = None
    lr: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None


class TrainingCompleted(Event):
    """After the outputs are written; the paths of the method's weight files."""

    event: Literal["completed"] = EVENT_COMPLETED
    method: str | None = None
    output_dir: str | None = None
    learned_embeds: str | None = None  # textual inversion
    lora_weights: str | None = None  # LoRA, diffusers naming
    lora_weights_kohya: str | None = None  # LoRA, kohya naming
    steps: int | None = None
    final_loss: float | None = None
    wall_seconds: float | None = None
    concept_similarity: dict[str, float] | None = None


class TrainingStopped(Event):
    event: Literal["stopped"] = EVENT_STOPPED
    step: int
    checkpoint: str


class ExportCompleted(Event):
    """The InferenceJob pod's last line: what was exported from what, and the images."""

    event: Literal["completed"] = EVENT_COMPLETED
    openvino: str | None = None
    source: str | None = None  # "pipeline", "embeddings" or "lora": what was exported
    weights: str | None = None  # the embedding or LoRA file added to the base model
    export_cache: str | None = None  # "hit", "stored", or None (exported in full)
    export_seconds: float | None = None
    samples: str | None = None
    grid: str | None = None
    image_paths: list[str] = []
    images: int | None = None
    seconds_per_image: float | None = None
    concept_similarity: dict[str, float] | None = None
