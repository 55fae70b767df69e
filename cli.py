"""Run the lmzip command from a checkout (`python cli.py ...`); installed, it is `lmzip`."""

from lmzip.cli import main

if __name__ == "__main__":
    main(prog_name="lmzip")
