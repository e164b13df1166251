"""Subcommands: thin click wrappers that parse arguments and call one core function."""
