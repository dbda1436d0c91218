"""Where the tests find the project's shared inputs: `shared/` beside the checkout (as in CI)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAVA_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE = SHARED / "reference" / "llava"
