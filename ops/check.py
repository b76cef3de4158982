"""`megacity check`: everything CI runs, in one command (`.ci/run` calls exactly this).

ruff (lint and format), mypy --strict (our code and the generated stubs), buf lint, buf breaking against the
previous commit, freshness of everything generated, then pytest. Every step runs even when an earlier one
fails, so one run reports all problems; the exit code is non-zero if any failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ops.codegen import REPO

PYTHON_PATHS = ["services", "ops", "gateway", "tests"]


def _step(title: str, command: Sequence[str]) -> bool:
    print(f"\n=== {title}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, check=False)
    verdict = "ok" if done.returncode == 0 else f"FAILED ({done.returncode})"
    print(f"=== {title}: {verdict} in {time.monotonic() - started:.1f}s", flush=True)
    return done.returncode == 0


def _previous_commit_with_contracts() -> str | None:
    """The previous commit, when it exists locally and already had contracts to compare against."""
    previous = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "HEAD~1^{commit}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if previous.returncode != 0:
        return None
    commit = previous.stdout.strip()
    has_buf = subprocess.run(["git", "cat-file", "-e", f"{commit}:buf.yaml"], cwd=REPO, capture_output=True)
    return commit if has_buf.returncode == 0 else None


def _breaking() -> bool:
    commit = _previous_commit_with_contracts()
    if commit is None:
        print(
            "\n=== buf breaking: no previous commit with contracts in this clone; nothing to compare",
            flush=True,
        )
        return True
    return _step(
        "buf breaking",
        [str(Path(sys.executable).parent / "buf"), "breaking", "--against", f".git#ref={commit}"],
    )


def run(pytest_args: Sequence[str] = ()) -> int:
    bin_dir = Path(sys.executable).parent
    results = {
        "ruff": _step("ruff", [str(bin_dir / "ruff"), "check", *PYTHON_PATHS]),
        "ruff format": _step("ruff format", [str(bin_dir / "ruff"), "format", "--check", *PYTHON_PATHS]),
        "mypy": _step("mypy --strict", [str(bin_dir / "mypy")]),
        "buf lint": _step("buf lint", [str(bin_dir / "buf"), "lint"]),
        "buf breaking": _breaking(),
        "freshness": _step("generated code is fresh", [sys.executable, "-m", "ops.cli", "gen", "--check"]),
        "pytest": _step("pytest", [sys.executable, "-m", "pytest", *pytest_args]),
    }
    failed = [name for name, passed in results.items() if not passed]
    print("\n" + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}"), flush=True)
    return 1 if failed else 0
