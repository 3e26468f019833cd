"""A runtime_env's ``pip``: its spec as Ray normalizes it, and the virtual environment
it gets, built with pip once per spec in a cache folder. The env sees its host's own
packages (Cairn among them) after its own. Node daemons build them for their workers
(controlplane/node/runtime_envs.py); the jobs' supervisor (controlplane/jobs.py) for a
submitted entrypoint, in the head's cache, where the head's workers then find it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import site
import sys
from pathlib import Path
from typing import Any

OUTPUT_KEPT = 4000  # characters of pip's output in an event or error
RUNTIME_RESOURCES = "runtime_resources"  # a session's cache of runtime envs (pip/: venvs)
_READY_MARK = ".cairn-ready"


class SetupFailed(Exception):
    """The env cannot be set up; the message is what its tasks are told."""


def pip_spec(value: Any) -> dict[str, Any]:
    """Ray's forms (a list of requirements, a requirements file, a dict with
    ``packages``) as one dict."""
    if isinstance(value, dict):
        spec = {"pip_check": False, "pip_install_options": [], **value}
        spec["packages"] = requirements(spec["packages"])
        return spec
    return {"packages": requirements(value), "pip_check": False, "pip_install_options": []}


def requirements(value: Any) -> list[str]:
    """A list of requirements, or the lines of a requirements file (read where the
    spec is resolved, as Ray reads it on the driver)."""
    if isinstance(value, list | tuple):
        return list(value)
    path = Path(value).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(
            f"runtime_env['pip']: cannot read the requirements file {str(value)!r}: {exc}"
        ) from None
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def venv_name(spec: dict[str, Any]) -> str:
    """The folder name of a spec's env (the spec and this Python's version)."""
    text = json.dumps([spec, sys.version], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def build_venv(cache: Path, spec: dict[str, Any]) -> tuple[Path, str]:
    """The env of ``spec`` under ``cache`` and pip's output (empty: built before);
    SetupFailed with the failing command's output."""
    venv = cache / venv_name(spec)
    if (venv / _READY_MARK).exists():
        return venv, ""
    shutil.rmtree(venv, ignore_errors=True)  # a build that did not end
    venv.parent.mkdir(parents=True, exist_ok=True)
    output = await _run(
        "creating the virtual environment",
        sys.executable,
        "-m",
        "venv",
        "--without-pip",
        str(venv),
    )
    python = venv / "bin" / "python"
    site_dir = Path(
        (
            await _run(
                "locating it",
                str(python),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            )
        ).strip()
    )
    # this host's own packages (Cairn itself among them) come after the env's own
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (site_dir / "_cairn_node_packages.pth").write_text(lines)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    quiet = ["--disable-pip-version-check", "--no-input"]
    packages = list(spec.get("packages") or [])
    if packages:
        output += await _run(
            "pip install", *pip, "install", *quiet, *spec.get("pip_install_options", []), *packages
        )
    if spec.get("pip_check"):
        output += await _run("pip check", *pip, "check", *quiet)
    (venv / _READY_MARK).write_text(json.dumps(spec))
    return venv, output


async def _run(what: str, *argv: str) -> str:
    """Runs a command of a setup; its output; SetupFailed with that output if it fails.
    Killed if the setup is given up (its timeout)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise SetupFailed(f"{what} failed (exit code {process.returncode}):\n{text[-OUTPUT_KEPT:]}")
    return text
