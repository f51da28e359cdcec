import sys
from pathlib import Path

# tests import their helpers module; the repository's scripts/ is deliberately not a package
sys.path.insert(0, str(Path(__file__).resolve().parent))
