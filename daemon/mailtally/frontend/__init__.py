"""The query frontend: a web form where a sender asks for their own report by mail.

A separate process from the daemon (``python -m mailtally.frontend``, or any WSGI
server given ``create_app``); it shares only the store, opened read-only, and the
report code. Its own state (used codes, rate limits) is a small SQLite file of its own.
"""

from __future__ import annotations

from mailtally.frontend.app import create_app
from mailtally.frontend.settings import FrontendSettings, frontend_settings

__all__ = ["FrontendSettings", "create_app", "frontend_settings"]
