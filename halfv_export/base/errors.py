"""Errors that reach the user as one line. The CLI maps them to exit codes; nothing else does.

BadInput      -> exit 2: the user gave something we cannot use (a path, a flag, a schedule); the message names
                 the problem and the fix.
RuntimeFailure -> exit 1: the inputs were fine but a stage failed (validation threshold, runtime error).
"""


class HalfvError(Exception):
    exit_code = 1


class BadInput(HalfvError):
    exit_code = 2


class RuntimeFailure(HalfvError):
    exit_code = 1
