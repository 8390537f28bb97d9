from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: one line, no traceback."""

    exit_code = 2


class AuthError(UserError):
    exit_code = 3


class HubError(UserError):
    exit_code = 4
