"""`python -m fxzip ...`: the same as the `fxzip` console script."""
import sys

from .cli import main

sys.exit(main())
