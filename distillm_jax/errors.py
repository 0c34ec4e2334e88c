"""The one error type for a user's mistake, in a module of its own so that every layer (config checks,
methods, run-folder checks) raises it without importing the config layer."""


class ConfigError(ValueError):
    """A config value that cannot run; the message says which key and what to do."""
