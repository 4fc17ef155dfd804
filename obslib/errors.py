"""The two kinds of failure obslib reports in one line (exit code 2 on the command line)."""


class UsageError(ValueError):
    """Bad user input: reported as one line with exit code 2 on the command line (a ValueError in the library)."""


class SolverError(ValueError):
    """A layer cannot be solved: non-finite weights or statistics, or a Hessian that stays singular."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``timeout``): handled like Ctrl-C, so whatever the run leaves is said in one line."""
