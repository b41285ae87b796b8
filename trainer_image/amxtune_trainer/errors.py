"""Errors a user can fix: printed as one line naming the problem, no traceback.

The exit codes and the line format are the contract with the operator (amxtune_api.events).
"""

from amxtune_api.events import EXIT_INPUT_ERROR, EXIT_NODE_LACKS_AMX, INPUT_ERROR, NODE_LACKS_AMX


class UserError(Exception):
    """Bad input (options, data, model, paths). The message must say what was expected.

    `every_rank`: every rank raises the same error (it was gathered from all of them), so only
    rank 0 prints it.
    """

    exit_code = EXIT_INPUT_ERROR
    kind = INPUT_ERROR

    def __init__(self, message: str, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


class NodeLacksAmx(UserError):
    """The job requires AMX and this node's CPU has none: its labels are wrong or stale."""

    exit_code = EXIT_NODE_LACKS_AMX
    kind = NODE_LACKS_AMX


class Stopped(Exception):
    """Told to stop (SIGTERM: eviction, drain, suspend; SIGINT: Ctrl-C): every rank ended the
    same step and rank 0 saved a checkpoint of it. Exits with 128 + the signal number, as if
    the signal had ended the process."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved, the "
                         "same command resumes from it")
        self.signum = signum
        self.step = step
