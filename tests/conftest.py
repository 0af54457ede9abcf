import sys
from pathlib import Path

# The helpers module is imported by name in spawned server processes too.
sys.path.insert(0, str(Path(__file__).parent))
