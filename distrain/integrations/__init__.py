"""Runs of distrain under other frameworks' launchers (Ray Train). Each module imports its
framework only when called."""
