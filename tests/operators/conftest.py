"""Make `llava_operator` importable from the source tree.

pyproject's package discovery looks in "." and "platform" only; until "operators" is added there the
package is not on the venv's path, and the operator subprocesses get the same PYTHONPATH.
"""

from __future__ import annotations

import sys
from pathlib import Path

OPERATORS_DIR = Path(__file__).resolve().parents[2] / "operators"
if str(OPERATORS_DIR) not in sys.path:
    sys.path.insert(0, str(OPERATORS_DIR))
