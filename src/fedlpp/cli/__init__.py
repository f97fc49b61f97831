"""The command line (``fedlpp``): thin commands that read the config and hand over to the engine and the experiments."""

from fedlpp.cli.main import main

__all__ = ["main"]
