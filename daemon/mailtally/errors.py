"""Errors mailtally reports to its user as one line; the CLI maps them to exit codes."""

from __future__ import annotations


class MailtallyError(Exception):
    """Base of every error meant for the user; `exit_code` follows DESIGN.md."""

    exit_code = 1


class UsageError(MailtallyError):
    """A bad command line: wrong option value, missing file argument."""

    exit_code = 2


class ConfigError(MailtallyError):
    """A bad configuration file; the message names the file, line and key."""

    exit_code = 2


class StoreError(MailtallyError):
    """The database cannot be opened, migrated or written."""


class SourceError(MailtallyError):
    """A log source cannot be read."""
