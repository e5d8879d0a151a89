"""embtab: CLI, config loading and embedded service launchers."""

__version__ = "0.1.0"
