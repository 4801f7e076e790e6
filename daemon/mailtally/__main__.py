"""Allow ``python -m mailtally``."""

from mailtally.cli import main

raise SystemExit(main())
