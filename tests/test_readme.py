"""The README's two set-up commands are its first two fenced blocks, and .ci/run runs
exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.DOTALL)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    install_and_demo, tests = fenced_blocks((ROOT / "README.md").read_text())[:2]
    assert install_and_demo.count("\n") == 0 and "sdk.demo" in install_and_demo
    assert tests.count("\n") == 0 and "pytest" in tests
    ci_commands = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_commands == [tests]
