"""``python -m m2pt_cli`` is ``m2pt``."""

from m2pt_cli.cli import main

main()
