"""Errors that are the user's to fix: the CLI prints them on one line and exits with code 2."""


class UserError(ValueError):
    """Bad input (config value, path, data file, subnet) with a message that names it and what would be valid."""
