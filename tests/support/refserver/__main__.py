"""``python3 -m tests.support.refserver``: the reference Resource API in the foreground."""

import sys

from tests.support.refserver.cli import main

if __name__ == "__main__":
    sys.exit(main())
