"""`python -m syncbn.check`: see `syncbn.check`."""

import sys

from syncbn.check.cli import main

if __name__ == "__main__":
    sys.exit(main())
