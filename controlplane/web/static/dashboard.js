// Cairn's dashboard: one page, a view per location hash (#/tasks?state=FAILED), each
// drawn from the JSON of /api/cairn/ (the log's SQL views). No framework and no build
// step: the few hundred lines below are the whole client, and everything they need
// ships in the package.

const LIVE_S = 2;
const TASK_STATES = ["", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT",
  "SUBMITTED_TO_WORKER", "RUNNING", "FINISHED", "FAILED"];
const SVG = "http://www.w3.org/2000/svg";

// -- small helpers -------------------------------------------------------------------

async function api(path, options) {
  const answer = await fetch(path, options);
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(body.error || `${answer.status} ${answer.statusText}`);
  return body;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

const link = (hash, text) => el("a", { href: hash }, text ?? "");
const query = (params) => new URLSearchParams(params).toString();
const short = (id) => (id && id.length > 16 ? id.slice(0, 16) + "…" : id ?? "");

function shown(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "";
}

// A table of rows; ``columns`` are [heading, cell(row) -> value or Node].
function table(rows, columns, { id, rowId } = {}) {
  const head = el("tr", {}, columns.map(([heading]) => el("th", {}, heading)));
  const body = rows.map((row) =>
    el("tr", { "data-id": rowId ? rowId(row) : undefined },
      columns.map(([, cell]) => {
        const value = cell(row);
        const numeric = typeof value === "number";
        return el("td", { class: numeric ? "num" : undefined }, value instanceof Node ? value : shown(value));
      })));
  return el("table", { class: "rows", id }, el("thead", {}, head), el("tbody", {}, body));
}

const stateCell = (state) => el("span", { class: `state-${state}` }, state ?? "");

function facts(pairs) {
  return el("dl", { class: "facts" },
    pairs.flatMap(([term, value]) => [el("dt", {}, term),
      el("dd", {}, value instanceof Node ? value : shown(value))]));
}

function lines(found, className) {
  const box = el("div", { class: `${className}-box` });
  box.append(el("pre", { class: className }, found.lines.join("\n")));
  for (const note of found.notes) box.append(el("p", { class: "notes" }, note));
  return box;
}

function stateList(kind, filters, { limit = 100, detail = false } = {}) {
  const params = new URLSearchParams();
  for (const [column, value] of Object.entries(filters)) {
    if (value !== "" && value !== undefined) params.append("filter", `${column}=${value}`);
  }
  params.set("limit", String(limit));
  if (detail) params.set("detail", "1");
  return api(`/api/cairn/state/${kind}?${params}`);
}

function counted(answer) {
  const full = answer.rows.length >= answer.limit;
  return el("p", { class: "status", id: "row-count" },
    `${answer.rows.length} rows` + (full ? ` (the limit, ${answer.limit}: raise it to see more)` : ""));
}

// -- views: each returns {controls?, draw(region) -> Promise, live?} -------------------

const views = {};

views.jobs = () => ({
  live: true,
  async draw(region) {
    const answer = await stateList("jobs", {}, { limit: 1000, detail: true });
    region.replaceChildren(el("h2", {}, "Jobs"), counted(answer), table(answer.rows, [
      ["Job", (j) => link(`#/tasks?${query({ job_id: j.job_id })}`, j.job_id)],
      ["Submission", (j) => j.submission_id],
      ["Status", (j) => stateCell(j.status)],
      ["Entrypoint", (j) => j.entrypoint],
      ["Started", (j) => when(j.start_time)],
      ["Ended", (j) => when(j.end_time)],
      ["Message", (j) => j.message],
      ["Timeline", (j) => link(`#/timeline/${j.job_id}`, "timeline")],
    ], { id: "jobs", rowId: (j) => j.job_id }));
  },
});

const TASK_FILTERS = ["state", "job_id", "name", "type", "error_type", "node_id", "actor_id"];

views.tasks = (_, params) => {
  const form = el("form", { class: "filters", id: "task-filters" });
  for (const column of TASK_FILTERS) {
    const input = column === "state"
      ? el("select", { name: column }, TASK_STATES.map((s) => el("option", { value: s }, s || "any")))
      : el("input", { name: column, size: column.endsWith("_id") ? 20 : 14 });
    input.value = params.get(column) ?? "";
    form.append(el("label", {}, column, input));
  }
  const limit = el("input", { name: "limit", type: "number", min: "1", size: 6 });
  limit.value = params.get("limit") ?? "100";
  form.append(el("label", {}, "limit", limit), el("button", { type: "submit", id: "apply-filters" }, "Apply"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = {};
    for (const [key, value] of new FormData(form)) if (value !== "") chosen[key] = value;
    location.hash = `#/tasks?${query(chosen)}`;
  });
  return {
    controls: form,
    live: true,
    async draw(region) {
      const filters = Object.fromEntries(TASK_FILTERS.map((c) => [c, params.get(c) ?? ""]));
      const answer = await stateList("tasks", filters, { limit: Number(params.get("limit") ?? 100) });
      region.replaceChildren(el("h2", {}, "Tasks"), counted(answer), taskTable(answer.rows, "tasks"));
    },
  };
};

function taskTable(rows, id) {
  return table(rows, [
    ["Task", (t) => link(`#/task/${t.task_id}`, t.task_id)],
    ["Attempt", (t) => t.attempt_number],
    ["Name", (t) => t.name],
    ["State", (t) => stateCell(t.state)],
    ["Error", (t) => t.error_type],
    ["Type", (t) => t.type],
    ["Job", (t) => t.job_id],
    ["Node", (t) => short(t.node_id)],
    ["Worker pid", (t) => t.worker_pid],
  ], { id, rowId: (t) => `${t.task_id}/${t.attempt_number}` });
}

views.task = (taskId) => ({
  live: true,
  async draw(region) {
    const { rows: attempts } = await api(`/api/cairn/state/tasks/${taskId}`);
    const last = attempts[attempts.length - 1];
    const parts = [el("h2", {}, `Task ${last.name}`), facts([
      ["Task id", el("code", {}, taskId)],
      ["State", stateCell(last.state)],
      ["Job", link(`#/tasks?${query({ job_id: last.job_id })}`, last.job_id)],
      ["Type", last.type],
      ["Actor", last.actor_id ? link(`#/actor/${last.actor_id}`, last.actor_id) : ""],
      ["Parent task", last.parent_task_id ? link(`#/task/${last.parent_task_id}`, last.parent_task_id) : ""],
      ["Resources", last.required_resources],
      ["Timeline", link(`#/timeline/${last.job_id}`, "the job's timeline")],
    ])];
    parts.push(el("h3", {}, "Attempts"), table(attempts, [
      ["Attempt", (a) => a.attempt_number],
      ["State", (a) => stateCell(a.state)],
      ["Error", (a) => a.error_type],
      ["Node", (a) => short(a.node_id)],
      ["Worker pid", (a) => a.worker_pid],
      ["Started", (a) => when(a.start_time_ms)],
      ["Ended", (a) => when(a.end_time_ms)],
    ], { id: "attempts", rowId: (a) => String(a.attempt_number) }));
    for (const attempt of attempts) {
      if (attempt.error_message) {
        parts.push(el("h3", {}, `Error of attempt ${attempt.attempt_number} (${attempt.error_type})`),
          el("pre", { class: "traceback" }, attempt.error_message));
      }
    }
    for (const attempt of attempts) {
      if (attempt.start_time_ms === null) continue;
      const found = await api(`/api/cairn/tasks/${taskId}/output?attempt=${attempt.attempt_number}`);
      parts.push(el("h3", {}, `Output of attempt ${attempt.attempt_number}`), lines(found, "output"));
    }
    const objects = await stateList("objects", { task_id: taskId }, { limit: 1000 });
    if (objects.rows.length) {
      parts.push(el("h3", {}, "Objects it returned"), objectTable(objects.rows, "task-objects"));
    }
    region.replaceChildren(...parts);
  },
});

views.actors = () => ({
  live: true,
  async draw(region) {
    const answer = await stateList("actors", {}, { limit: 1000 });
    region.replaceChildren(el("h2", {}, "Actors"), counted(answer), table(answer.rows, [
      ["Actor", (a) => link(`#/actor/${a.actor_id}`, a.actor_id)],
      ["Class", (a) => a.class_name],
      ["Name", (a) => a.name],
      ["State", (a) => stateCell(a.state)],
      ["Job", (a) => a.job_id],
      ["Node", (a) => short(a.node_id)],
      ["Pid", (a) => a.pid],
    ], { id: "actors", rowId: (a) => a.actor_id }));
  },
});

views.actor = (actorId) => ({
  live: true,
  async draw(region) {
    const { rows: [actor] } = await api(`/api/cairn/state/actors/${actorId}`);
    const calls = await stateList("tasks", { actor_id: actorId }, { limit: 1000 });
    const output = await api(`/api/cairn/actors/${actorId}/output`);
    region.replaceChildren(el("h2", {}, `Actor ${actor.class_name}`), facts([
      ["Actor id", el("code", {}, actorId)],
      ["State", stateCell(actor.state)],
      ["Name", actor.name],
      ["Namespace", actor.ray_namespace],
      ["Node", actor.node_id],
      ["Pid", actor.pid],
      ["Restarts", actor.num_restarts],
      ["Death", actor.death_cause],
    ]), el("h3", {}, "Calls (and its creation)"), counted(calls), taskTable(calls.rows, "actor-calls"),
    el("h3", {}, "Output"), lines(output, "output"));
  },
});

function objectTable(rows, id) {
  return table(rows, [
    ["Object", (o) => link(`#/object/${o.object_id}`, o.object_id)],
    ["Size", (o) => o.object_size],
    ["State", (o) => o.state],
    ["Made by", (o) => (o.task_id ? link(`#/task/${o.task_id}`, short(o.task_id)) : o.type)],
    ["Task state", (o) => o.task_status],
    ["Held as", (o) => o.reference_type],
    ["Holder", (o) => (o.pid ? `pid ${o.pid} at ${o.ip}` : "")],
    ["Location", (o) => (o.locations ?? [o.node_id]).filter(Boolean).map(short).join(", ")],
  ], { id, rowId: (o) => o.object_id });
}

views.objects = () => ({
  live: true,
  async draw(region) {
    const answer = await stateList("objects", {}, { limit: 1000, detail: true });
    region.replaceChildren(el("h2", {}, "Objects"), counted(answer), objectTable(answer.rows, "objects"));
  },
});

views.object = (objectId) => ({
  live: false,
  async draw(region) {
    const [objects, tree] = await Promise.all([
      stateList("objects", { object_id: objectId }, { limit: 1000, detail: true }),
      api(`/api/cairn/lineage/${objectId}`),
    ]);
    region.replaceChildren(el("h2", {}, "Object"), el("p", {}, el("code", {}, objectId)),
      objectTable(objects.rows, "object-rows"), el("h3", {}, "Lineage"),
      el("p", { class: "notes" }, "What made it, and what that task was given, back to puts."),
      lineageGraph(tree));
  },
});

views.nodes = () => ({
  live: true,
  async draw(region) {
    const { rows } = await api("/api/cairn/nodes");
    region.replaceChildren(el("h2", {}, "Nodes"), table(rows, [
      ["Node", (n) => el("code", {}, n.node_id)],
      ["State", (n) => stateCell(n.state)],
      ["Address", (n) => n.address],
      ["Head", (n) => (n.head ? "yes" : "")],
      ["Resources (used / total)", (n) => resourceUse(n.resources ?? {}, n.available ?? {})],
      ["Load", (n) => load(n.load, n.resources?.object_store_memory)],
      ["Labels", (n) => n.labels],
      ["Death", (n) => n.death_cause],
    ], { id: "nodes", rowId: (n) => n.node_id }));
  },
});

function resourceUse(total, available) {
  return Object.entries(total).filter(([name]) => name !== "object_store_memory")
    .map(([name, amount]) => `${name} ${+(amount - (available[name] ?? amount)).toFixed(3)}/${amount}`)
    .join(", ");
}

function load(l, capacity) {
  if (!l) return "";
  return `store ${l.object_store_used}/${capacity ?? "?"} B; ${l.workers} workers; `
    + `${l.running_tasks} running, ${l.pending_tasks} queued, ${l.waiting_tasks} waiting; ${l.actors} actors`;
}

views.placement_groups = () => ({
  live: true,
  async draw(region) {
    const answer = await stateList("placement_groups", {}, { limit: 1000, detail: true });
    region.replaceChildren(el("h2", {}, "Placement groups"), counted(answer), table(answer.rows, [
      ["Placement group", (g) => el("code", {}, g.placement_group_id)],
      ["Name", (g) => g.name],
      ["State", (g) => stateCell(g.state)],
      ["Strategy", (g) => g.strategy],
      ["Job", (g) => g.creator_job_id],
      ["Bundles", (g) => g.bundles],
    ], { id: "placement-groups", rowId: (g) => g.placement_group_id }));
  },
});

views.timeline = (jobId) => ({
  live: true,
  async draw(region) {
    const trace = await api(`/api/cairn/timeline/${jobId}`);
    region.replaceChildren(el("h2", {}, `Timeline of job ${jobId}`),
      el("p", { class: "notes" }, `${trace.otherData.task_attempts} task attempts, one row per worker; `
        + "click an attempt to open its task."), timelineChart(trace));
  },
});

views.sql = () => {
  const statement = el("textarea", { id: "sql-statement", spellcheck: "false" },
    "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state");
  const result = el("div", { id: "sql-answer" });
  const run = async () => {
    result.replaceChildren(el("p", { class: "status" }, "running…"));
    try {
      const answer = await api("/api/cairn/sql", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ statement: statement.value }),
      });
      const count = answer.more ? `the first ${answer.rows.length} rows (there are more: `
        + "narrow the statement or add a LIMIT)" : `${answer.rows.length} rows`;
      result.replaceChildren(el("p", { class: "status", id: "sql-count" }, count),
        table(answer.rows, answer.columns.map((c, i) => [c, (row) => row[i]]), { id: "sql-result" }));
    } catch (error) {
      result.replaceChildren(el("p", { class: "error", id: "sql-error" }, error.message));
    }
  };
  statement.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run();
  });
  const controls = el("div", {}, el("h2", {}, "SQL"),
    el("p", { class: "notes" }, "One read-only statement, as cairn sql runs it: a write is refused "
      + "by the server. Views: tasks, task_attempts, objects, actors, actor_calls, nodes, jobs, "
      + "placement_groups, functions; the log itself: events."),
    statement, el("p", {}, el("button", { id: "sql-run", onclick: run }, "Run"), " (Ctrl+Enter)"), result);
  return { controls, live: false, async draw() {} };
};

// -- drawings --------------------------------------------------------------------------

function timelineChart(trace) {
  const threads = new Map();
  const processes = new Map();
  for (const e of trace.traceEvents) {
    if (e.ph === "M" && e.name === "process_name") processes.set(e.pid, e.args.name);
    if (e.ph === "M" && e.name === "thread_name") threads.set(`${e.pid}/${e.tid}`, e.args.name);
  }
  const spans = trace.traceEvents.filter((e) => e.ph === "X");
  const rows = [...threads.keys()];
  const start = Math.min(...spans.map((s) => s.ts));
  const end = Math.max(...spans.map((s) => s.ts + s.dur));
  const label = 260, width = 1100, rowHeight = 22, top = 24;
  const scale = (width - label - 10) / Math.max(1, end - start);
  const chart = svg("svg", { id: "timeline", width, height: top + rowHeight * rows.length + 10,
    viewBox: `0 0 ${width} ${top + rowHeight * rows.length + 10}` });
  const seconds = (end - start) / 1e6;
  chart.append(svg("text", { x: label, y: 14 }, "0 s"),
    svg("text", { x: width - 60, y: 14 }, `${seconds.toFixed(3)} s`));
  rows.forEach((key, index) => {
    const [pid] = key.split("/");
    const worker = threads.get(key) ?? "";
    const name = `${worker.slice(worker.lastIndexOf("-") + 1)} on ${short(processes.get(Number(pid)))}`;
    chart.append(svg("text", { x: 4, y: top + index * rowHeight + 15, class: "row-label" }, name));
  });
  for (const span of spans) {
    const row = rows.indexOf(`${span.pid}/${span.tid}`);
    const outcome = span.args.outcome === "finished" ? "finished" : span.args.outcome === "failed" ? "failed" : "other";
    const rect = svg("rect", {
      class: `span span-${outcome}`, x: label + (span.ts - start) * scale, y: top + row * rowHeight + 3,
      width: Math.max(2, span.dur * scale), height: rowHeight - 6, "data-task": span.args.task_id,
      onclick: () => { location.hash = `#/task/${span.args.task_id}`; },
    });
    rect.append(svg("title", {}, `${span.name} (task ${span.args.task_id}, attempt ${span.args.attempt}): `
      + `${(span.dur / 1000).toFixed(1)} ms, ${span.args.outcome ?? "running"}`));
    chart.append(rect);
  }
  return chart;
}

function lineageGraph(tree) {
  // A tidy tree: leaves get consecutive columns, a parent sits above its children's middle.
  const placed = [];
  let column = 0;
  const place = (item, depth) => {
    const children = (item.arguments ?? []).map((child) => place(child, depth + 1));
    const x = children.length ? (children[0].x + children[children.length - 1].x) / 2 : column++;
    const node = { item, depth, x, children };
    placed.push(node);
    return node;
  };
  place(tree, 0);
  const boxWidth = 200, boxHeight = 40, gapX = 20, gapY = 50;
  const depth = Math.max(...placed.map((n) => n.depth));
  const width = Math.max(1, column) * (boxWidth + gapX) + gapX;
  const height = (depth + 1) * (boxHeight + gapY) + gapY / 2;
  const graph = svg("svg", { id: "lineage", width, height, viewBox: `0 0 ${width} ${height}` });
  const left = (n) => gapX + n.x * (boxWidth + gapX);
  const topOf = (n) => gapY / 2 + n.depth * (boxHeight + gapY);
  for (const n of placed) {
    for (const child of n.children) {
      graph.append(svg("path", { class: "edge", d: `M ${left(n) + boxWidth / 2} ${topOf(n) + boxHeight} `
        + `L ${left(child) + boxWidth / 2} ${topOf(child)}` }));
    }
  }
  for (const n of placed) {
    const { item } = n;
    const made = item.task_id ? `${item.function ?? "?"}()` : "put";
    const group = svg("g", { class: item.task_id ? "node" : "node put", "data-object": item.object_id,
      onclick: () => { location.hash = `#/object/${item.object_id}`; } });
    group.append(svg("rect", { x: left(n), y: topOf(n), width: boxWidth, height: boxHeight, rx: 4 }),
      svg("text", { x: left(n) + 6, y: topOf(n) + 16 }, made),
      svg("text", { x: left(n) + 6, y: topOf(n) + 32 }, short(item.object_id)),
      svg("title", {}, `object ${item.object_id}` + (item.task_id ? ` made by task ${item.task_id}` : "")));
    graph.append(group);
  }
  return graph;
}

// -- the router --------------------------------------------------------------------------

let current = null;
let drawing = null; // the view whose draw is in flight

function parse() {
  const [path, search] = (location.hash.replace(/^#\/?/, "") || "jobs").split("?");
  const [name, ...rest] = path.split("/");
  return { name, argument: rest.map(decodeURIComponent).join("/"), params: new URLSearchParams(search ?? "") };
}

async function draw(live = false) {
  // a live tick waits for the draw in flight; a new view draws at once, and a draw of a
  // view left meanwhile is dropped
  const mine = current;
  if (!mine || (live && drawing === mine)) return;
  drawing = mine;
  const status = document.getElementById("status");
  try {
    // drawn aside, and shown only if it changed: a live view that did not change is left
    // as it is (a selection in it, a hovered bar, stay)
    const fresh = document.createElement("div");
    await mine.view.draw(fresh);
    if (current !== mine) return;
    const region = document.getElementById("view");
    if (fresh.innerHTML !== region.innerHTML) region.replaceChildren(...fresh.childNodes);
    status.textContent = `as of ${new Date().toLocaleTimeString()}`;
    status.classList.remove("error");
  } catch (error) {
    if (current !== mine) return;
    status.textContent = error.message;
    status.classList.add("error");
    if (!live) document.getElementById("view").replaceChildren();
  } finally {
    if (drawing === mine) drawing = null;
  }
}

function route() {
  const { name, argument, params } = parse();
  const make = views[name] ?? views.jobs;
  const view = make(argument, params);
  current = { view, name };
  document.getElementById("controls").replaceChildren(...(view.controls ? [view.controls] : []));
  document.getElementById("view").replaceChildren();
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("current", a.dataset.view === name || a.dataset.view === `${name}s`);
  }
  draw();
}

window.addEventListener("hashchange", route);
route();
setInterval(() => {
  if (current?.view.live && document.getElementById("live").checked) draw(true);
}, LIVE_S * 1000);
