"""The `fxzip` command line: one module per command."""
