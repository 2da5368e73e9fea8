"""``python -m fastprompt``: the command line (see fastprompt/cli.py)."""
import sys

from fastprompt.cli import main

sys.exit(main())
