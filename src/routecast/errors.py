"""The error a user can fix: bad input, told in one line.

Stage scripts (`routecast.pipeline.stage.stage`) print an `InputError` as one line and exit 1; any other
exception is a bug in routecast and keeps its full traceback. It subclasses `ValueError`, so a
caller catching `ValueError` still catches it.
"""


class InputError(ValueError):
    """What the user gave is wrong: params, a data file, a log, an argument, a database URL."""
