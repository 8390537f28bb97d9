"""`python -m pipeline.tune ...` (also under `accelerate launch -m pipeline.tune`): `python -m pipeline tune ...`."""

import sys

from pipeline.cli.main import main

if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a in ("-v", "--verbose")]
    sys.exit(main([*flags, "tune", *[a for a in sys.argv[1:] if a not in flags]]))
