"""The code type-checks (mypy), so its signatures can be trusted when reading it."""

import subprocess
import sys
from pathlib import Path


def test_code_is_mypy_clean() -> None:
    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-m", "mypy", "node", "models", "worker", "bench", "--ignore-missing-imports", "--follow-imports=silent"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
