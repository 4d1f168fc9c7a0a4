"""The one exception type that reaches the user as a one-line message (the CLI prints it, exits 1)."""


class UserError(Exception):
    """Bad input or an impossible request: the message says what and, where it can, what to do instead."""
