"""Errors a user can fix: printed as one line naming the problem, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input (options, data, model, paths). The message must say what was expected."""
