"""`python -m jaxpaged.server [flags]`: the same as `jaxpaged serve`."""

import sys

from jaxpaged.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
