"""`python -m ventilator` is the `ventilator` command."""

from ._lifeline import watch_parent
from .cli import main

# Child processes started with "spawn" import this module again under another
# name; only the real entry point may run the command line.
if __name__ == "__main__":
    watch_parent()
    main()
