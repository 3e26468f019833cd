"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium
through the system's chromedriver. A cluster started with ``cairn start --head`` runs a
job with a failing task, an actor and a placement group; the tests find the failed task
through the filters, open its traceback and output, draw the timeline and the lineage,
run the SQL console, and check what each view shows against the SQL views. Screenshots
go to ``test-artifacts/dashboard/`` at the checkout's root.

The README's test command installs chromium and chromium-driver where they are missing;
without them these tests fail, saying so."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from machine_cluster import MachineCluster, machine_cluster
from processes import dashboard_address, gcs_url_of, run_driver

from controlplane.readonly_sql import run_readonly

pytestmark = pytest.mark.timeout(180)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
BROWSER = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
NEEDS = (
    "the dashboard's browser tests need Debian's chromium and chromium-driver "
    f"({BROWSER}, {DRIVER}): `apt-get install chromium chromium-driver` (the README's "
    "test command installs them where they are missing)"
)
T = TypeVar("T")

JOB = """
import sdk as ray
from sdk.util.placement_group import placement_group

ray.init(address="auto")

@ray.remote
def square(x):
    print("squaring", x)
    return x * x

@ray.remote
def total(*xs):
    return sum(xs)

@ray.remote(max_retries=0)
def broken(x):
    print("about to fail on", x)
    raise ValueError(f"bad input {x}")

@ray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        print("counter adds", k)
        self.n += k
        return self.n

made = total.remote(*[square.remote(i) for i in range(3)])
assert ray.get(made) == 5
counter = Counter.options(name="counter", lifetime="detached").remote()
assert ray.get([counter.add.remote(i) for i in range(3)]) == [0, 1, 3]
group = placement_group([{"CPU": 1}], name="the-group")
ray.get(group.ready())
try:
    ray.get(broken.remote(7))
except Exception:
    pass
print("JOB", ray.get_runtime_context().get_job_id())
print("MADE", made.hex())
"""


@dataclass(frozen=True)
class Dashboard:
    url: str  # http://host:port
    gcs_url: str
    job_id: str
    made: str  # the object total() returned (its lineage: 3 squares)
    cluster: MachineCluster

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        return asyncio.run(run_readonly(self.gcs_url, statement, args))[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    with machine_cluster(["--num-cpus", "2", "--dashboard-port", "0"]) as cluster:
        done = run_driver(tmp_path_factory.mktemp("job"), JOB)
        found = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
        yield Dashboard(
            f"http://{dashboard_address(cluster.head.session_dir)}",
            gcs_url_of(cluster.head.session_dir),
            found["JOB"],
            found["MADE"],
            cluster,
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(BROWSER).exists() and shutil.which(DRIVER)):
        pytest.fail(NEEDS)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # (its profile and the folders it leaves in TMPDIR go with it)
    private = Path(tempfile.mkdtemp(prefix="cairn-browser-"))
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.add_argument(f"--user-data-dir={private / 'profile'}")
    service = Service(DRIVER, env={**os.environ, "TMPDIR": str(private)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.implicitly_wait(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(private, ignore_errors=True)


def eventually(find: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """What ``find`` gives once it gives something (the page draws after its fetches)."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )

    deadline = time.monotonic() + timeout
    while True:
        try:
            found = find()
        except (NoSuchElementException, StaleElementReferenceException):
            found = None  # (not drawn yet, or a live redraw replaced it)
        if found:
            return found
        assert time.monotonic() < deadline, f"the page did not show {what}"
        time.sleep(0.1)


def open_view(browser: Any, dashboard: Dashboard, hash_path: str) -> None:
    browser.get(f"{dashboard.url}/#{hash_path}")


def table_ids(browser: Any, table_id: str) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, f"table#{table_id} tbody tr")
    return [row.get_attribute("data-id") for row in rows]


def shown_ids(browser: Any, table_id: str, expected: int) -> list[str]:
    """The ids of a table's rows, once it has ``expected`` of them."""
    return eventually(
        lambda: (ids := table_ids(browser, table_id)) and len(ids) == expected and ids,
        f"{expected} rows in #{table_id}",
    )


def shows(browser: Any, table_id: str, expected: set[str]) -> None:
    """Waits until the ids of a table's rows are ``expected`` (repeats aside)."""
    eventually(
        lambda: set(table_ids(browser, table_id)) == expected,
        f"the rows {sorted(expected)} in #{table_id}",
    )


def screenshot(browser: Any, name: str) -> None:
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_the_failed_task_is_found_through_the_filters_with_its_traceback_and_output(
    dashboard: Dashboard, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_view(browser, dashboard, "/tasks")
    form = eventually(lambda: browser.find_element(By.ID, "task-filters"), "the filters")
    Select(form.find_element(By.NAME, "state")).select_by_value("FAILED")
    form.find_element(By.NAME, "job_id").send_keys(dashboard.job_id)
    form.find_element(By.ID, "apply-filters").click()
    failed = dashboard.sql(
        "SELECT task_id || '/' || attempt FROM tasks WHERE state = 'FAILED' AND job_id = $1",
        dashboard.job_id,
    )
    assert len(failed) == 1
    eventually(lambda: "state=FAILED" in browser.current_url, "the filters in its address")
    assert shown_ids(browser, "tasks", 1) == [failed[0][0]]
    screenshot(browser, "tasks-filtered-failed")

    task_id = failed[0][0].split("/")[0]
    browser.find_element(By.CSS_SELECTOR, f"table#tasks a[href='#/task/{task_id}']").click()
    traceback = eventually(
        lambda: browser.find_element(By.CSS_SELECTOR, "pre.traceback").text, "the traceback"
    )
    assert traceback.startswith("Traceback (most recent call last)")
    assert "in broken" in traceback and traceback.rstrip().endswith("ValueError: bad input 7")
    output = eventually(
        lambda: browser.find_element(By.CSS_SELECTOR, "pre.output").text, "the output"
    )
    assert output == "about to fail on 7"
    assert table_ids(browser, "attempts") == ["0"]
    screenshot(browser, "task-failed-traceback-output")


def test_the_jobs_timeline_is_drawn_one_bar_per_attempt(dashboard: Dashboard, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    open_view(browser, dashboard, "/jobs")
    assert dashboard.job_id in shown_ids(browser, "jobs", len(dashboard.sql("SELECT 1 FROM jobs")))
    browser.find_element(By.CSS_SELECTOR, f"a[href='#/timeline/{dashboard.job_id}']").click()
    attempts = dashboard.sql(
        "SELECT a.task_id FROM task_attempts a JOIN tasks t USING (task_id)"
        " WHERE t.job_id = $1 AND a.started_at IS NOT NULL",
        dashboard.job_id,
    )

    def drawn() -> list[tuple[str, float, str]]:  # (read at once: the view is redrawn live)
        found = [
            (
                b.get_attribute("data-task"),
                float(b.get_attribute("width")),
                b.get_attribute("class"),
            )
            for b in browser.find_elements(By.CSS_SELECTOR, "svg#timeline rect.span")
        ]
        return found if len(found) == len(attempts) else []

    bars = eventually(drawn, f"{len(attempts)} bars")
    assert sorted(task for task, _, _ in bars) == sorted(a[0] for a in attempts)
    failed = dashboard.sql(
        "SELECT task_id FROM tasks WHERE state = 'FAILED' AND job_id = $1", dashboard.job_id
    )
    assert [task for task, _, kind in bars if "span-failed" in kind] == [failed[0][0]]
    assert all(width > 0 for _, width, _ in bars)
    screenshot(browser, "timeline")


def test_an_objects_lineage_is_drawn_as_a_graph(dashboard: Dashboard, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    open_view(browser, dashboard, f"/object/{dashboard.made}")
    lineage = dashboard.sql("SELECT object_id, function_name FROM lineage($1)", dashboard.made)
    assert len(lineage) == 4  # total() and the three squares
    nodes = eventually(
        lambda: browser.find_elements(By.CSS_SELECTOR, "svg#lineage g.node"), "the lineage graph"
    )
    assert sorted(n.get_attribute("data-object") for n in nodes) == sorted(r[0] for r in lineage)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg#lineage .edge")) == 3
    labels = browser.find_element(By.ID, "lineage").text
    assert labels.count("square()") == 3 and "total()" in labels
    screenshot(browser, "lineage")


def test_the_sql_console_shows_rows_and_refuses_a_write(dashboard: Dashboard, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    events = dashboard.sql("SELECT count(*) FROM events")[0][0]
    open_view(browser, dashboard, "/sql")
    statement = eventually(lambda: browser.find_element(By.ID, "sql-statement"), "the console")
    statement.clear()
    statement.send_keys(
        f"SELECT task_id, state FROM tasks WHERE job_id = '{dashboard.job_id}' ORDER BY task_id"
    )
    browser.find_element(By.ID, "sql-run").click()
    eventually(lambda: browser.find_elements(By.ID, "sql-result"), "the rows")
    cells = [
        tuple(td.text for td in row.find_elements(By.TAG_NAME, "td"))
        for row in browser.find_elements(By.CSS_SELECTOR, "table#sql-result tbody tr")
    ]
    expected = dashboard.sql(
        "SELECT task_id, state FROM tasks WHERE job_id = $1 ORDER BY task_id", dashboard.job_id
    )
    assert cells == [tuple(row) for row in expected] and len(cells) >= 8
    screenshot(browser, "sql-rows")

    statement.clear()  # a large answer: the first 1000 rows, and a word that there are more
    statement.send_keys("SELECT n FROM generate_series(1, 100000) n")
    browser.find_element(By.ID, "sql-run").click()
    count = eventually(
        lambda: (c := browser.find_elements(By.ID, "sql-count")) and "more" in c[0].text and c,
        "the count",
    )
    assert count[0].text.startswith("the first 1000 rows")
    shown = browser.find_elements(By.CSS_SELECTOR, "table#sql-result tbody tr")
    assert len(shown) == 1000 and shown[-1].text == "1000"

    for write in ("DELETE FROM events", "WITH gone AS (DELETE FROM events RETURNING 1) SELECT 1"):
        statement.clear()
        statement.send_keys(write)
        browser.find_element(By.ID, "sql-run").click()
        refused = eventually(
            lambda: (e := browser.find_elements(By.ID, "sql-error")) and e[0].text, "the refusal"
        )
        assert "refus" in refused
    screenshot(browser, "sql-write-refused")
    assert dashboard.sql("SELECT count(*) FROM events")[0][0] >= events  # nothing deleted


def test_each_view_shows_what_the_sql_views_hold(dashboard: Dashboard, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    views = {
        "actors": ("actors", "SELECT actor_id FROM actors"),
        "objects": ("objects", "SELECT DISTINCT object_id FROM objects"),
        "nodes": ("nodes", "SELECT node_id FROM nodes"),
        "placement_groups": (
            "placement-groups",
            "SELECT placement_group_id FROM placement_groups",
        ),
    }
    for view, (table_id, statement) in views.items():
        open_view(browser, dashboard, f"/{view}")
        expected = {row[0] for row in dashboard.sql(statement)}
        assert expected, f"the job made no {view}"
        shows(browser, table_id, expected)
        screenshot(browser, view)

    actor_id = dashboard.sql("SELECT actor_id FROM actors WHERE name = 'counter'")[0][0]
    open_view(browser, dashboard, f"/actor/{actor_id}")
    calls = dashboard.sql(
        "SELECT task_id FROM tasks WHERE actor_id = $1 ORDER BY submitted_at", actor_id
    )
    shown = shown_ids(browser, "actor-calls", len(calls))
    assert sorted(i.split("/")[0] for i in shown) == sorted(c[0] for c in calls)
    output = eventually(lambda: browser.find_element(By.CSS_SELECTOR, "pre.output").text, "output")
    assert [f"counter adds {i}" for i in range(3)] == output.splitlines()
    screenshot(browser, "actor")


def test_a_view_stays_live_while_a_job_runs(
    dashboard: Dashboard, browser: Any, tmp_path: Path
) -> None:
    open_view(browser, dashboard, "/tasks?name=__main__.late")
    eventually(lambda: table_ids(browser, "tasks") == [] and "0 rows" in browser.page_source, "0")
    run_driver(
        tmp_path,
        """
        import sdk as ray
        ray.init(address="auto")
        ray.get(ray.remote(lambda: 1).options(name="__main__.late").remote())
        """,
    )
    late = dashboard.sql("SELECT task_id || '/' || attempt FROM tasks WHERE name = '__main__.late'")
    assert shown_ids(browser, "tasks", 1) == [late[0][0]]  # without a reload
