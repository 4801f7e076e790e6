"""Serve the query frontend with waitress: ``python -m mailtally.frontend --config FILE``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mailtally.config import DEFAULT_PATH, load_config
from mailtally.errors import MailtallyError

log = logging.getLogger("mailtally.frontend")


def serve(config_path: Path, listen: str | None = None) -> None:
    """Load the config, build the app and serve it until stopped; MailtallyError if unfit."""
    import waitress  # type: ignore[import-untyped]

    from mailtally.frontend.app import create_app
    from mailtally.frontend.settings import frontend_settings

    config = load_config(config_path)
    settings = frontend_settings(config, config_path)
    if listen is not None:
        settings = settings.model_copy(update={"listen": listen})
    app = create_app(config, settings, config_path=config_path)
    log.info("frontend listening listen=%s", settings.listen)
    # No trusted_proxy: REMOTE_ADDR stays the peer, and the app alone reads
    # X-Forwarded-For, from frontend.proxies only.
    waitress.serve(app, listen=settings.listen, threads=settings.threads, ident="mailtally")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailtally.frontend",
        description="Serve the mailtally query frontend (the form that mails reports).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-c", "--config", type=Path, default=DEFAULT_PATH, help="config file")
    parser.add_argument("--listen", help="HOST:PORT instead of frontend.listen")
    parser.add_argument("--debug", action="store_true", help="log debug lines and tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        serve(args.config, args.listen)
    except MailtallyError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"mailtally frontend: {exc}\n")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
