"""The `pconv` command line: one module per command, errors mapped in main.py, output through output.py."""
