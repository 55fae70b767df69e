"""`python -m lmzip` runs the lmzip command."""

from .cli import main

main(prog_name="lmzip")
