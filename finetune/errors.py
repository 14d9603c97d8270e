"""Errors caused by the user's input: the command line prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """A problem with a recipe, a data file, a checkpoint path or a command-line argument."""

    exit_code = 2


class DataError(UserError):
    """Bad dataset input: the message names the file and, where there is one, the line."""
