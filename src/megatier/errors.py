"""The one exception type users see for bad input: its message is a single line naming what is wrong."""


class MegatierError(Exception):
    """Bad input (file, config, request, flag). The message names the culprit and, where possible, the fix."""
