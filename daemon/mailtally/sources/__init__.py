"""Where log lines come from: files (and, with the daemon, the journal)."""
