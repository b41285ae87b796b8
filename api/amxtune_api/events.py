"""What a trainer process tells whoever started it (the operator, `amxtune run`), besides files.

Exit codes say what kind of failure it was; the pod's container status carries them to the
operator. JSON lines on stdout (rank 0 only) carry progress; one-line messages on stderr carry
failures. Both sides import these names, so the contract is written once.
"""

from __future__ import annotations

import re

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
