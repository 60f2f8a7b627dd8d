"""No function in memfuse/ is more complex than ruff's C901 allows (max-complexity 10, in
pyproject.toml): a function past it is split into named steps (issue 18 point 4)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_function_is_over_the_complexity_limit():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--select", "C901", "--output-format", "concise", "memfuse"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"over the limit:\n{result.stdout}{result.stderr}"


def test_the_check_sees_a_complex_function(tmp_path):
    # the check must be able to fail: a function with 11 branches is flagged
    branches = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(11))
    (tmp_path / "complex.py").write_text(f"def f(x):\n{branches}    return -1\n")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--config", str(ROOT / "pyproject.toml"), "--select", "C901",
                             str(tmp_path / "complex.py")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "C901" in result.stdout, result.stdout + result.stderr
