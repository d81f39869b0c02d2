"""Errors the CLI turns into one line on stderr and exit code 2."""


class UserError(Exception):
    """Something the user can fix: bad argument, missing or mismatched file, unreachable board."""
