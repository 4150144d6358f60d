"""`python -m fxzip demo`: the same as the `fxzip` console script."""
import sys

from .cli.main import main

sys.exit(main())
