"""``python -m featlab`` (and ``torchrun -m featlab``) runs the command-line interface."""

from featlab.cli import run

run()
