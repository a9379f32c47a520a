// The ventilator dashboard: polls the broker's JSON once a second and redraws.
// No framework and no network beyond the broker: it must work offline. Every
// value from the broker goes into the page as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function fill(id, rows, columns, emptyText) {
  const body = document.getElementById(id);
  if (rows.length === 0) {
    rows = [el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText))];
  }
  body.replaceChildren(...rows);
}

const sum = (values) => values.reduce((a, b) => a + b, 0);
const number = (n) => Number(n).toLocaleString("en-US");

function ago(seconds) {
  if (seconds < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${(seconds / 60).toFixed(0)} min`;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0";
  if (value < 0.001) return `${+(value * 1e6).toPrecision(3)}µs`;
  if (value < 1) return `${+(value * 1000).toPrecision(3)}ms`;
  return `${+value.toPrecision(3)}s`;
}

// "tests.tasks:a", "tests.tasks:b" -> one line per module: "tests.tasks: a, b".
function byModule(services) {
  const modules = new Map();
  for (const name of services) {
    const cut = name.lastIndexOf(":");
    const module = cut < 0 ? "" : name.slice(0, cut);
    if (!modules.has(module)) modules.set(module, []);
    modules.get(module).push(cut < 0 ? name : name.slice(cut + 1));
  }
  return [...modules].map(([module, names]) => el("div", { class: "services" },
    el("code", {}, module ? `${module}:` : ""), " ",
    el("span", { class: "muted" }, names.join(", "))));
}

// --- figures and tables -----------------------------------------------------------

function renderCards(status, history) {
  const workers = status.workers;
  const queued = sum(Object.values(status.queued));
  const running = sum(Object.values(status.running));
  // Counts of every client: the list holds the most relevant ones only.
  const counts = status.client_counts;
  const sinks = counts.connected_sinks;
  setText("workers-count", number(workers.length));
  // Slots as workers declared them, not their credit (capacity), which
  // prefetch makes many times larger for short tasks; of the workers that can
  // take a task, as ventilator_worker_slots counts them.
  const taking = workers.filter((w) => w.services.length && !w.draining);
  setText("slots", `${number(sum(taking.map((w) => w.slots ?? 0)))} slots`);
  setText("queued-total", number(queued));
  setText("running-total", `${number(running)} running`);
  // Items, as users count them: a batch of map items is one task to the broker.
  const items = status.items;
  setText("completed-total", number(items.completed));
  setText("failed-total", number(items.failed));
  setText("clients-count", `${number(counts.connected - sinks)} · ${number(sinks)}`);
  setText("results-waiting", `${number(status.results_waiting)} results waiting`);
  const last = history.slice(-5);
  const rate = (key) => (last.length ? sum(last.map((s) => s[key])) / last.length : 0);
  setText("completed-rate",
    `${rate("completed").toFixed(1)} /s over 5 s · ${number(status.totals.completed)} tasks`);
  setText("failed-rate",
    `${rate("failed").toFixed(1)} /s · ${number(items.cancelled)} cancelled · ${number(status.totals.failed)} tasks`);
}

// Tasks a worker holds beyond those it runs wait on it (prefetch).
function prefetched(worker) {
  return worker.prefetched ? el("span", { class: "sub" }, ` +${worker.prefetched} waiting`) : "";
}

// How long the worker's oldest task has run: a hung task keeps this growing.
function oldest(seconds) {
  return seconds === null || seconds === undefined ? "–" : ago(seconds);
}

function renderWorkers(workers) {
  const rows = workers.map((w) => {
    const load = w.capacity ? Math.min(100, (100 * w.running) / w.capacity) : 0;
    const state = w.draining ? el("span", { class: "tag warn" }, "draining") : "";
    // A worker where no task can run serves nothing, and says why.
    const problem = w.problem
      ? el("div", { class: "problem" }, el("span", { class: "tag warn" }, "serves nothing"),
        " ", w.problem)
      : "";
    return el("tr", {},
      el("td", {}, el("code", {}, w.id), " ", state, problem),
      el("td", {}, ...byModule(w.services)),
      el("td", { class: "num" }, w.capacity),
      el("td", { class: "num" }, w.running, prefetched(w),
        el("div", { class: "bar" }, el("span", { style: `width:${load}%` }))),
      el("td", { class: "num" }, oldest(w.oldest_running_s)),
      el("td", { class: "num" }, `${ago(w.last_seen_s)} ago`));
  });
  fill("workers", rows, 6, "no worker connected");
}

// The order `ventilator status` lists functions in (scheduler.busiest_first):
// the most tasks queued and on workers first; equal ones by name, with the
// numbers in names by value (job2 before job10), as scheduler.name_order.
function nameOrder(name) {
  const numbers = name.replace(/[0-9]+/g, (run) => {
    const value = run.replace(/^0+(?=[0-9])/, "");
    return String(Math.min(value.length, 999)).padStart(3, "0") + value;
  });
  return `${numbers}\0${name}`;
}

function busiestFirst(queued, running) {
  const load = (name) => (queued[name] || 0) + (running[name] || 0);
  const names = [...new Set([...Object.keys(queued), ...Object.keys(running)])];
  const order = new Map(names.map((name) => [name, nameOrder(name)]));
  const byName = (a, b) => (order.get(a) < order.get(b) ? -1 : 1);
  return names.sort((a, b) => load(b) - load(a) || byName(a, b));
}

function renderQueues(status) {
  const names = busiestFirst(status.queued, status.running);
  // A queue no connected worker serves (a typo'd name) would read as a slow
  // one: marked, as `ventilator status` marks it.
  const unserved = new Set(status.unserved || []);
  const rows = names.map((name) => el("tr", {},
    el("td", {}, el("code", {}, name),
      ...(unserved.has(name) ? [" ", el("span", { class: "tag warn" }, "no worker serves it")] : [])),
    el("td", { class: "num" }, number(status.queued[name] || 0)),
    el("td", { class: "num" }, number(status.running[name] || 0))));
  fill("queues", rows, 3, "no task queued or running");
}

function renderFailures(failed, total) {
  const rows = failed.map((f) => el("tr", { "data-ticket": f.ticket },
    el("td", { class: "num" }, f.ticket),
    el("td", {}, el("code", {}, f.function)),
    el("td", {}, el("span", { class: "tag bad" }, f.outcome)),
    el("td", { class: "reason" }, `${f.type}: ${f.message}`),
    el("td", {}, el("code", {}, `${f.session} · ${f.task_id_str}`)),
    el("td", { class: "num" }, `${ago(f.failed_s_ago)} ago`)));
  fill("failures", rows, 6, "no failed task");
  // The list survives a broker restart (it is journalled); the count does not.
  setText("failed-note", failed.length
    ? `(latest ${failed.length}; ${number(total)} failed since the broker started)`
    : "");
}

function renderClients(clients) {
  const rows = clients.map((c) => el("tr", {},
    el("td", {}, el("code", {}, c.name)),
    el("td", {}, c.kind),
    el("td", {}, el("span", { class: c.connected ? "tag ok" : "tag" },
      c.connected ? "connected" : "away")),
    el("td", { class: "num" }, number(c.pending)),
    el("td", { class: "num" }, number(c.unacknowledged))));
  fill("clients", rows, 5, "no client");
}

// --- charts: hand-drawn SVG --------------------------------------------------------

const HEIGHT = 180;
const PAD = { left: 52, right: 8, top: 10, bottom: 20 };

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function drawChart(id, samples, series, format) {
  const svg = document.getElementById(id);
  // Drawn at the size shown, so text and dots are never stretched.
  const WIDTH = Math.max(200, Math.round(svg.clientWidth || 600));
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  const values = series.flatMap((s) => samples.map((p) => p[s.key]).filter((v) => v !== null));
  const top = niceMax(Math.max(0, ...values));
  const t0 = samples.length ? samples[0].time : 0;
  const t1 = samples.length ? samples[samples.length - 1].time : 1;
  const span = Math.max(1, t1 - t0);
  const x = (t) => PAD.left + ((t - t0) / span) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);

  const nodes = [];
  for (const fraction of [0, 0.5, 1]) {
    const level = y(top * fraction);
    nodes.push(svgEl("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: level, y2: level }));
    const label = svgEl("text", { class: "axis", x: PAD.left - 6, y: level + 4, "text-anchor": "end" });
    label.textContent = format(top * fraction);
    nodes.push(label);
  }
  const spanLabel = svgEl("text", { class: "axis", x: PAD.left, y: HEIGHT - 4 });
  spanLabel.textContent = samples.length > 1 ? `last ${ago(span)}` : "collecting…";
  nodes.push(spanLabel);
  const nowLabel = svgEl("text", { class: "axis", x: WIDTH - PAD.right, y: HEIGHT - 4, "text-anchor": "end" });
  nowLabel.textContent = "now";
  nodes.push(nowLabel);

  for (const s of series) {
    const known = samples.filter((p) => p[s.key] !== null);
    const points = known.map((p) => `${x(p.time).toFixed(1)},${y(p[s.key]).toFixed(1)}`);
    if (s.dots) {
      // Durations exist only where tasks finished: mark each one, since a
      // burst of work leaves single samples a line would not show.
      for (const p of known) {
        nodes.push(svgEl("circle", { class: `dot ${s.css}`, cx: x(p.time), cy: y(p[s.key]), r: 2.5 }));
      }
    }
    if (points.length < 2) continue;
    if (s.area) {
      const base = y(0).toFixed(1);
      const first = points[0].split(",")[0];
      const last = points[points.length - 1].split(",")[0];
      nodes.push(svgEl("polygon", { class: "area", points: `${first},${base} ${points.join(" ")} ${last},${base}` }));
    }
    nodes.push(svgEl("polyline", { class: `series ${s.css}`, points: points.join(" ") }));
  }
  svg.replaceChildren(...nodes);
}

function renderCharts(history) {
  drawChart("throughput-chart", history, [
    { key: "completed", css: "ok", area: true },
    { key: "failed", css: "bad" },
  ], (v) => (v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(v < 10 && v % 1 ? 1 : 0)));
  drawChart("duration-chart", history, [
    { key: "duration_max_s", css: "dim", dots: true },
    { key: "duration_mean_s", css: "accent", dots: true },
  ], seconds);
}

// --- polling -------------------------------------------------------------------------

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  const connection = document.getElementById("connection");
  try {
    const [status, history] = await Promise.all([getJson("/api/status"), getJson("/api/history")]);
    renderCards(status, history.samples);
    renderWorkers(status.workers);
    renderQueues(status);
    renderFailures(status.recent_failures, status.totals.failed);
    renderClients(status.clients);
    renderCharts(history.samples);
    connection.textContent = "live";
    connection.className = "pill live";
    setText("updated", `updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (error) {
    connection.textContent = "broker unreachable";
    connection.className = "pill down";
    setText("updated", String(error.message || error));
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

refresh();
