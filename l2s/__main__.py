"""`python -m l2s` runs the command-line interface."""

from l2s.cli import main

main()
