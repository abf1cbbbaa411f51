"""The long-running service: daemon, admin API, metrics and logging."""
