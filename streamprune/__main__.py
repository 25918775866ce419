"""`python -m streamprune` is the `streamprune` command."""

from .cli import main

main()
