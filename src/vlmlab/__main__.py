"""``python -m vlmlab`` runs the CLI."""

from vlmlab.cli import main

main()
