"""mailtally: per-sender daily counters from Postfix logs."""

__version__ = "0.1.0"
