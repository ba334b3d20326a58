"""Subcommands of the ``precision`` CLI, one module each."""
