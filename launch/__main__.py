"""`python -m launch ...` runs the `syncbn-launch` command line."""

import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
