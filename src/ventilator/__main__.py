"""`python -m ventilator` is the `ventilator` command."""

from .cli import main

main()
