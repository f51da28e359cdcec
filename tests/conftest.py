import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# tests import their helpers module and the repository's tools, which are plain modules in
# scripts/ (deliberately not a package: every bundle has its own `scripts` package)
sys.path[:0] = [str(TESTS), str(TESTS.parent / "scripts")]
