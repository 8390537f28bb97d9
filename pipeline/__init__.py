"""Abliterator Space pipeline: measure, edit, tune, evaluate, card and push models."""

from pathlib import Path

# The package's own folder (shipped data lives in PACKAGE_DIR / "data"): modules find it from here, not from
# their own file, so they keep working wherever they sit inside the package.
PACKAGE_DIR = Path(__file__).resolve().parent
