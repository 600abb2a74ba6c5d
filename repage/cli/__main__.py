"""`python -m repage.cli`."""

from repage.cli import main

main()
