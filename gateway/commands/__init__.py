"""What a user types: the `gateway` command line, `ctl`, `check`/`diagnose` and `export`."""
