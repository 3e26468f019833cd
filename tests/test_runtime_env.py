"""``runtime_env`` as Cairn honours it (issue 18): ``env_vars`` of the job (``init``), of
a task or an actor, merged as Ray merges them (the child's fields over the parent's,
``env_vars`` key by key), inherited by nested tasks; ``working_dir`` and ``py_modules``
packed once, stored in the GCS by digest and unpacked per node (``excludes`` honoured);
``pip`` built into a virtual environment once per spec per node, its failure a
RuntimeEnvSetupError carrying pip's error, ``setup_timeout_seconds`` honoured; each
task's env in the log by content hash; what Cairn does not build refused by name. Real
node daemon, workers, pip and PostgreSQL."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from log_rows import rows, wait_for_rows
from processes import run_driver
from ray_session import private_cluster

import sdk as ray
from controlplane import runtime_env_packages as packages

pytestmark = pytest.mark.timeout(400)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(
        num_cpus=1, runtime_env={"env_vars": {"CAIRN_T_JOB": "job", "CAIRN_T_A": "a"}}
    )


@ray.remote
def env(*names: str) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


@ray.remote
def nested() -> dict[str, str | None]:
    return ray.get(env.remote("CAIRN_T_JOB", "CAIRN_T_A", "CAIRN_T_TASK"))


@ray.remote
class Holder:
    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def runtime_env(self) -> dict:
        return ray.get_runtime_context().runtime_env


def test_the_jobs_env_vars_reach_its_tasks_and_a_tasks_own_override_them() -> None:
    assert ray.get(env.remote("CAIRN_T_JOB", "CAIRN_T_A")) == {
        "CAIRN_T_JOB": "job",
        "CAIRN_T_A": "a",
    }
    own = env.options(runtime_env={"env_vars": {"CAIRN_T_A": "task", "CAIRN_T_TASK": "t"}})
    ref = own.remote("CAIRN_T_JOB", "CAIRN_T_A", "CAIRN_T_TASK")
    assert ray.get(ref) == {"CAIRN_T_JOB": "job", "CAIRN_T_A": "task", "CAIRN_T_TASK": "t"}
    # the same worker, the next task: back to the job's
    assert ray.get(env.remote("CAIRN_T_A", "CAIRN_T_TASK")) == {
        "CAIRN_T_A": "a",
        "CAIRN_T_TASK": None,
    }
    row = wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT payload->'runtime_env'->'env_vars'->>'CAIRN_T_A' AS a FROM events "
        "WHERE entity_id = $1 AND event_type = 'submitted'",
        ref.task_id().hex(),
    )
    assert row[0]["a"] == "task"  # the environment of each task is in the log


def test_nested_tasks_inherit_their_parents_env_vars() -> None:
    parent = nested.options(runtime_env={"env_vars": {"CAIRN_T_TASK": "parent"}})
    assert ray.get(parent.remote()) == {
        "CAIRN_T_JOB": "job",
        "CAIRN_T_A": "a",
        "CAIRN_T_TASK": "parent",
    }


def test_an_actors_env_vars_hold_for_its_life() -> None:
    holder = Holder.options(runtime_env={"env_vars": {"CAIRN_T_ACTOR": "yes"}}).remote()
    assert ray.get(holder.env.remote("CAIRN_T_ACTOR")) == "yes"
    assert ray.get(holder.env.remote("CAIRN_T_JOB")) == "job"
    assert ray.get(holder.runtime_env.remote())["env_vars"]["CAIRN_T_ACTOR"] == "yes"


def test_what_cairn_does_not_honour_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'conda' is not supported by Cairn"):
        env.options(runtime_env={"conda": "env.yaml"})
    with pytest.raises(ValueError, match="unknown runtime_env field 'colour'"):
        env.options(runtime_env={"colour": "blue"})
    with pytest.raises(ValueError, match="env_vars"):
        env.options(runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="remote URIs are not fetched"):
        Holder.options(runtime_env={"working_dir": "s3://bucket/code.zip"})
    with pytest.raises(ValueError, match="pip_version"):
        env.options(runtime_env={"pip": {"packages": ["x"], "pip_version": "==23"}})
    with pytest.raises(ValueError, match="setup_timeout_seconds"):
        env.options(runtime_env={"config": {"setup_timeout_seconds": 0}})
    with pytest.raises(ValueError, match="does not exist"):  # packed when submitted
        env.options(runtime_env={"working_dir": "/nonexistent/cairn-dir"}).remote("A")


# -- working_dir, py_modules, excludes ---------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder as a user's project: a module, a data file, and what excludes leave out."""
    root = tmp_path / "project"
    (root / "pkgdata").mkdir(parents=True)
    (root / "wd_helper.py").write_text("def answer():\n    return 'from the working_dir'\n")
    (root / "pkgdata" / "numbers.txt").write_text("1 2 3")
    (root / "run.log").write_text("noise")
    (root / "cache").mkdir()
    (root / "cache" / "big.bin").write_bytes(os.urandom(1024))
    return root


@ray.remote
def look_around() -> dict:
    import wd_helper  # only in the working_dir

    found = sorted(  # (the import above may write bytecode there: not the package's)
        str(Path(folder, name).relative_to(os.getcwd()))
        for folder, _, names in os.walk(os.getcwd())
        for name in names
        if "__pycache__" not in Path(folder).parts
    )
    return {
        "answer": wd_helper.answer(),
        "files": found,
        "cwd": os.getcwd(),
        "first_on_path": sys.path[0],
        "numbers": Path("pkgdata/numbers.txt").read_text(),
    }


def test_a_working_dir_is_the_workers_folder_without_what_excludes_names(project: Path) -> None:
    runtime_env = {"working_dir": str(project), "excludes": ["*.log", "cache/"]}
    ref = look_around.options(runtime_env=runtime_env).remote()
    seen = ray.get(ref, timeout=60)
    assert seen["answer"] == "from the working_dir"
    assert seen["numbers"] == "1 2 3"
    assert seen["files"] == ["pkgdata/numbers.txt", "wd_helper.py"]
    assert seen["first_on_path"] == seen["cwd"] != str(project)  # a copy, unpacked by the node
    assert "runtime_resources" in seen["cwd"]
    # the same folder again: the same package (stored once), the same unpacked copy
    again = ray.get(look_around.options(runtime_env=runtime_env).remote(), timeout=60)
    assert again["cwd"] == seen["cwd"]
    url = ray.get_runtime_context().gcs_address
    row = wait_for_rows(
        url,
        "SELECT payload->'runtime_env'->>'working_dir' AS wd, payload->>'runtime_env_hash' AS h "
        "FROM events WHERE entity_id = $1 AND event_type = 'submitted'",
        ref.task_id().hex(),
    )[0]
    assert row["wd"].startswith("cairn://pkg/") and len(row["h"]) == 64
    digest = row["wd"].removeprefix("cairn://pkg/").removesuffix(".zip")
    stored = rows(url, "SELECT size_bytes FROM runtime_env_packages WHERE digest = $1", digest)
    assert len(stored) == 1 and stored[0]["size_bytes"] > 0


def test_an_unchanged_folder_packs_to_the_same_bytes_and_a_changed_one_does_not(
    project: Path,
) -> None:
    first = packages.pack(project, ["cache/"])
    time.sleep(0.01)
    (project / "run.log").touch()  # a newer mtime changes nothing
    assert packages.pack(project, ["cache/"]) == first
    (project / "wd_helper.py").write_text("changed = True\n")
    assert packages.digest_of(packages.pack(project, ["cache/"])) != packages.digest_of(first)


@pytest.mark.parametrize(
    ("path", "is_dir", "patterns", "left_out"),
    [
        ("a/b/run.log", False, ["*.log"], True),
        ("a/b/run.log", False, ["/run.log"], False),  # anchored at the top
        ("run.log", False, ["/run.log"], True),
        ("cache", True, ["cache/"], True),
        ("cache", False, ["cache/"], False),  # a file of that name stays
        ("a/data/x.csv", False, ["a/**/*.csv"], True),
        ("keep.log", False, ["*.log", "!keep.log"], False),
    ],
)
def test_excludes_follow_gitignore(path: str, is_dir: bool, patterns: list, left_out: bool) -> None:
    assert packages.excluded(path, is_dir, patterns) is left_out


@ray.remote
class InFolder:
    def read(self) -> str:
        return Path("pkgdata/numbers.txt").read_text()

    def module(self) -> int:
        import cairn_t_mod

        return cairn_t_mod.VALUE


def test_py_modules_are_importable_by_tasks_and_actors_as_modules_or_folders(
    project: Path, tmp_path: Path
) -> None:
    package = tmp_path / "mods" / "cairn_t_mod"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 42\n")

    @ray.remote
    def use() -> tuple[int, str]:
        import cairn_t_mod

        return cairn_t_mod.VALUE, cairn_t_mod.__file__

    value, where = ray.get(use.options(runtime_env={"py_modules": [str(package)]}).remote())
    assert value == 42 and "runtime_resources" in where
    sys.path.insert(0, str(package.parent))  # the module object itself, as Ray takes it
    try:
        import cairn_t_mod

        assert ray.get(use.options(runtime_env={"py_modules": [cairn_t_mod]}).remote())[0] == 42
    finally:
        sys.path.remove(str(package.parent))
        sys.modules.pop("cairn_t_mod", None)
    actor = InFolder.options(
        runtime_env={"working_dir": str(project), "py_modules": [str(package)]}
    ).remote()
    assert ray.get(actor.read.remote(), timeout=60) == "1 2 3"
    assert ray.get(actor.module.remote()) == 42


# -- pip ---------------------------------------------------------------------------------


@ray.remote
def tomli_w_version() -> tuple[str, str, str]:
    import tomli_w

    # the node's own packages stay importable after the env's
    return (
        tomli_w.dumps({"a": 1}).strip(),
        tomli_w.__file__,
        ray.get_runtime_context().get_node_id(),
    )


def test_pip_builds_one_env_per_spec_per_node_and_reuses_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ImportError):  # not in the test venv: it comes from the env only
        import tomli_w  # noqa: F401
    spec = {"pip": ["tomli-w==1.0.0"], "config": {"setup_timeout_seconds": 300}}
    first = tomli_w_version.options(runtime_env=spec).remote()
    dumped, where, node_id = ray.get(first, timeout=300)
    assert dumped == "a = 1" and "runtime_resources" in where
    again = ray.get(tomli_w_version.options(runtime_env=spec).remote(), timeout=60)
    assert again[1] == where  # the same virtual environment
    url = ray.get_runtime_context().gcs_address
    built = rows(
        url,
        "SELECT payload->>'output' AS output FROM events WHERE entity_id = $1 "
        "AND event_type = 'runtime_env_ready' AND payload->>'output' LIKE '%tomli%'",
        node_id,
    )
    assert len(built) == 1  # built once; pip's output in the log
    assert "Successfully installed tomli-w-1.0.0" in built[0]["output"]
    assert "Successfully installed tomli-w-1.0.0" in caplog.text  # and at the driver


def test_a_failed_pip_build_is_a_runtime_env_setup_error_with_pips_error() -> None:
    spec = {"pip": ["cairn-no-such-package-anywhere==0.0.1"]}
    with pytest.raises(ray.exceptions.RuntimeEnvSetupError) as raised:
        ray.get(env.options(runtime_env=spec).remote("A"), timeout=300)
    assert "cairn-no-such-package-anywhere" in str(raised.value)
    assert "pip install failed" in str(raised.value)
    actor = Holder.options(runtime_env=spec).remote()
    with pytest.raises(ray.exceptions.ActorDiedError, match="RuntimeEnvSetupError"):
        ray.get(actor.env.remote("A"), timeout=300)
    url = ray.get_runtime_context().gcs_address
    failed = rows(
        url, "SELECT payload->>'error' AS error FROM events WHERE event_type = 'runtime_env_failed'"
    )
    assert failed and "cairn-no-such-package-anywhere" in failed[0]["error"]


def test_setup_timeout_seconds_gives_up_on_a_setup_that_hangs() -> None:
    silent = socket.socket()  # an index that accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        index = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
        spec = {
            "pip": {
                "packages": ["tomli-w==1.0.0"],
                "pip_install_options": ["--index-url", index, "--no-cache-dir", "--timeout", "100"],
            },
            "config": {"setup_timeout_seconds": 3},
        }
        started = time.monotonic()
        with pytest.raises(ray.exceptions.RuntimeEnvSetupError, match="within 3 s"):
            ray.get(env.options(runtime_env=spec).remote("A"), timeout=120)
        assert time.monotonic() - started < 60
    finally:
        silent.close()


def test_a_replayed_task_runs_on_the_files_it_ran_on(project: Path) -> None:
    from controlplane.replay import replay
    from sdk import runtime

    ref = look_around.options(runtime_env={"working_dir": str(project)}).remote()
    assert ray.get(ref, timeout=60)["answer"] == "from the working_dir"
    (project / "wd_helper.py").write_text("def answer():\n    return 'edited since'\n")
    assert runtime._runtime is not None and runtime._runtime.head is not None
    report = replay(
        ray.get_runtime_context().gcs_address,
        runtime._runtime.head.socket_path,
        ray.get_runtime_context().get_job_id(),
        task_id=ref.task_id().hex(),
    )
    (compared,) = report.comparisons
    assert compared.replayed is not None and compared.same


EAGER = """
    import asyncio, sys
    import asyncpg
    import sdk as ray

    ray.init(num_cpus=1, runtime_env={{"py_modules": [{module!r}], "config": {config}}})
    {work}
    url = ray.get_runtime_context().gcs_address

    async def positions():
        conn = await asyncpg.connect(url)
        try:
            for _ in range(600):  # (written behind: a few ms after it happened)
                ready = await conn.fetchval(
                    "SELECT min(position) FROM events WHERE event_type = 'runtime_env_ready'"
                )
                if ready is not None:
                    break
                await asyncio.sleep(0.05)
            task = await conn.fetchval(
                "SELECT min(position) FROM events WHERE entity_kind = 'task'"
            )
            return ready, task
        finally:
            await conn.close()

    print("POSITIONS", *asyncio.run(positions()))
"""


def test_eager_install_sets_the_jobs_env_up_at_init_and_lazily_without_it(
    tmp_path: Path,
) -> None:
    package = tmp_path / "eager_mod"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 7\n")
    eager = run_driver(tmp_path, EAGER.format(module=str(package), config="{}", work=""))
    ready, task = eager.stdout.split("POSITIONS")[1].split()
    assert ready != "None" and task == "None"  # set up with no task asking for it
    work = "assert ray.get(ray.remote(lambda: __import__('eager_mod').VALUE).remote()) == 7"
    lazy = run_driver(
        tmp_path,
        EAGER.format(module=str(package), config={"eager_install": False}, work=work),
    )
    ready, task = lazy.stdout.split("POSITIONS")[1].split()
    assert int(ready) > int(task)  # set up for the first task that needed it


def test_a_requirements_file_is_read_where_the_env_is_given(tmp_path: Path) -> None:
    from sdk import runtime_env

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# pinned\ntomli-w==1.0.0  # small\n\nsix>=1.16\n")
    resolved = runtime_env.resolve({"pip": str(requirements)}, gcs_url="")
    assert resolved["pip"] == {
        "packages": ["tomli-w==1.0.0", "six>=1.16"],
        "pip_check": False,
        "pip_install_options": [],
    }
    given = {"pip": {"packages": str(requirements), "pip_check": True}}
    assert runtime_env.resolve(given, gcs_url="")["pip"]["pip_check"] is True
    with pytest.raises(ValueError, match="cannot read the requirements file"):
        runtime_env.resolve({"pip": str(tmp_path / "missing.txt")}, gcs_url="")
