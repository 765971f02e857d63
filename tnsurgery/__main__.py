"""``python -m tnsurgery`` runs the command line."""

from tnsurgery.cli import main

main()
