"""`python -m pipeline.push DIR --repo-id OWNER/NAME ...`: upload an output folder to the Hub."""

import sys

from pipeline.publish.push import main

if __name__ == "__main__":
    sys.exit(main())
