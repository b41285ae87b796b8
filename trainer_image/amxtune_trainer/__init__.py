"""amxtune-trainer: the code that runs in every worker pod (and on a laptop)."""

__version__ = "0.1.0"
