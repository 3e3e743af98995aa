"""Where the repository is, for tests at any depth of tests/ (they mirror the package tree)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
