"""The `lmforge` subcommands, one module each; `lmforge/cli/main.py` adds them to the command group."""
