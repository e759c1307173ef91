// The status page's script (served as /status.js): polls /api/status every second and draws the
// page from it. Charts are inline SVG; no library, no build step. Text from the status (stream
// and shard names, errors) is always set as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let previous = null; // the last status, for per-shard rates

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const int = (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"));

function ms(v) {
  if (v === null || v === undefined) return "–";
  if (Math.abs(v) < 1000) return `${Math.round(v)} ms`;
  if (Math.abs(v) < 60000) return `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`;
  return `${Math.floor(v / 60000)} min ${Math.round((v % 60000) / 1000)} s`;
}

function bytes(v) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

// A time of day; with tenths of a second when the time is not on a whole second (batch
// intervals below one second).
function clock(t) {
  const d = new Date(t);
  const hms = d.toLocaleTimeString("en-GB", { hour12: false });
  return t % 1000 === 0 ? hms : `${hms}.${Math.floor((t % 1000) / 100)}`;
}

function rate(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  return v >= 100 ? int(v) : v.toFixed(1);
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function td(value, cls) {
  const cell = el("td", cls ? { class: cls } : {});
  cell.append(value instanceof Node ? value : String(value));
  return cell;
}

function tag(text, cls) { return el("span", { class: `tag ${cls || ""}` }, text); }

// A line chart of one value per batch, with an optional dashed bound line.
function chart(id, batches, value, bound) {
  const root = $(id);
  const W = 600, H = 180, left = 56, right = 12, top = 12, bottom = 26;
  const parts = [];
  if (batches.length === 0) {
    parts.push(svg("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "no batch completed yet"));
    root.replaceChildren(...parts);
    root.dataset.points = "0";
    return;
  }
  const ys = batches.map(value);
  let max = Math.max(...ys, bound || 0, 1);
  const step = niceStep(max / 4);
  max = Math.ceil(max / step) * step;
  const x0 = batches[0].batch_time_ms;
  const x1 = batches[batches.length - 1].batch_time_ms;
  const span = Math.max(x1 - x0, 1);
  const px = (t) => (batches.length === 1 ? left + (W - left - right) / 2 : left + ((t - x0) / span) * (W - left - right));
  const py = (v) => top + (1 - v / max) * (H - top - bottom);
  for (let v = 0; v <= max + step / 2; v += step) {
    parts.push(svg("line", { class: "grid", x1: left, x2: W - right, y1: py(v), y2: py(v) }));
    parts.push(svg("text", { class: "axis-label", x: left - 6, y: py(v) + 4, "text-anchor": "end" }, shortNumber(v)));
  }
  for (const [t, anchor] of [[x0, "start"], [x0 + span / 2, "middle"], [x1, "end"]]) {
    if (batches.length === 1 && anchor !== "middle") continue;
    parts.push(svg("text", { class: "axis-label", x: px(t), y: H - 8, "text-anchor": anchor }, clock(t)));
  }
  const points = batches.map((b, i) => [px(b.batch_time_ms), py(ys[i])]);
  const line = points.map(([x, y], i) => `${i === 0 ? "M" : "L"}${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
  const base = py(0).toFixed(1);
  parts.push(svg("path", { class: "area", d: `${line} L${points[points.length - 1][0].toFixed(1)},${base} L${points[0][0].toFixed(1)},${base} Z` }));
  parts.push(svg("path", { class: "series", d: line }));
  batches.forEach((b, i) => {
    const dot = svg("circle", { class: b.adopted ? "dot adopted" : "dot", cx: points[i][0].toFixed(1), cy: points[i][1].toFixed(1), r: 2.2 });
    dot.append(svg("title", {}, `${clock(b.batch_time_ms)}: ${shortNumber(ys[i])}${b.adopted ? " (adopted log)" : ""}`));
    parts.push(dot);
  });
  if (bound) parts.push(svg("line", { class: "bound", x1: left, x2: W - right, y1: py(bound), y2: py(bound) }));
  root.replaceChildren(...parts);
  root.dataset.points = String(batches.length);
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-9))));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

function shortNumber(v) {
  if (v >= 1e6) return `${(v / 1e6).toFixed(v >= 1e7 ? 0 : 1)}M`;
  if (v >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function facts(dl, entries) {
  const nodes = [];
  for (const [k, v] of entries) nodes.push(el("dt", {}, k), el("dd", {}, v));
  dl.replaceChildren(...nodes);
}

function render(s) {
  const intervalS = s.batch_interval_ms / 1000;
  const batches = s.batches;
  const own = batches.filter((b) => !b.adopted);

  const state = el("b", { class: `state-${s.state}` }, s.state);
  $("summary-line").replaceChildren(
    "worker ", el("b", {}, s.worker_id), " · ", state, " · up ", ms(s.now_ms - s.started_ms),
    " · batch interval ", ms(s.batch_interval_ms), " · updated ", clock(s.now_ms));

  const alerts = [];
  if (s.error) alerts.push(el("div", { class: "alert" }, `The stream stopped: ${s.error}`));
  for (const input of s.inputs) {
    if (input.failed) alerts.push(el("div", { class: "alert" }, `Receiver of ${input.stream} gave up: ${input.failed}`));
  }
  for (const d of s.detectors) {
    if (d.active) alerts.push(el("div", { class: "alert warn" }, `Detector ${d.name}: ${detectorValue(d)} is above its bound ${detectorBound(d)}`));
  }
  $("alerts").replaceChildren(...alerts);

  const m = s.metrics;
  $("batch-count").textContent = int(m.batches_completed);
  $("batch-count").dataset.value = String(m.batches_completed);
  $("records-processed").textContent = int(m.records_processed);
  const avg = (f) => (own.length ? own.reduce((a, b) => a + f(b), 0) / own.length : null);
  const avgRate = avg((b) => b.num_records / intervalS);
  $("avg-input-rate").textContent = avgRate === null ? "–" : `${rate(avgRate)}/s`;
  $("avg-scheduling-delay").textContent = ms(avg((b) => b.scheduling_delay_ms));
  $("avg-processing-time").textContent = ms(avg((b) => b.processing_delay_ms));
  $("avg-total-delay").textContent = ms(avg((b) => b.scheduling_delay_ms + b.processing_delay_ms));
  $("task-failures").textContent = `${int(m.task_failures)} / ${int(m.task_attempts)}`;
  $("dead-letters").textContent = int(m.dead_letters);

  $("batch-window").textContent = String(batches.length);
  const stuck = s.detectors.find((d) => d.name === "stuck_processing");
  chart("chart-input-rate", batches, (b) => b.num_records / intervalS);
  chart("chart-processing-time", batches, (b) => b.processing_delay_ms, s.batch_interval_ms);
  chart("chart-scheduling-delay", batches, (b) => b.scheduling_delay_ms);
  chart("chart-total-delay", batches, (b) => b.scheduling_delay_ms + b.processing_delay_ms, stuck ? stuck.bound : undefined);

  renderShards(s);
  renderInputs(s);
  renderDetectors(s);
  renderRecovery(s);

  const bs = s.block_store;
  facts($("block-store"), [
    ["memory", `${bytes(bs.memory_bytes_in_use)} of ${bytes(bs.memory_budget_bytes)} (${int(bs.memory_blocks)} blocks)`],
    ["blocks stored", int(bs.blocks_stored)],
    ["spilled to disk", int(bs.spilled_to_disk)],
    ["replicated", int(bs.replicated)],
    ["evicted / dropped", `${int(bs.evictions)} / ${int(bs.dropped_on_eviction + bs.dropped_too_large)}`],
    ["reads from memory / disk / replica", `${int(bs.memory_hits)} / ${int(bs.disk_hits)} / ${int(bs.replica_hits)}`],
    ["blocks replayed", `${int(m.blocks_replayed)} (${int(m.records_replayed)} records${m.replay_micros ? `, ${rate(m.records_replayed / (m.replay_micros / 1e6))} records/s` : ""})`],
    ["corrupt copies discarded", int(bs.corrupt_copies)],
  ]);

  const stages = Object.entries(m.dead_letters_by_stage);
  fillRows($("dead-letter-stages").tBodies[0], stages.length
    ? stages.map(([stage, n]) => el("tr", {}, td(stage, "mono"), td(int(n), "num")))
    : [el("tr", {}, td(el("span", { class: "muted" }, "none"), ""), td("", "num"))]);

  fillRows($("batches").tBodies[0], batches.slice(-20).reverse().map((b) => el("tr", b.adopted ? { class: "adopted" } : {},
    td(clock(b.batch_time_ms)), td(int(b.num_records), "num"), td(ms(b.scheduling_delay_ms), "num"),
    td(ms(b.processing_delay_ms), "num"), td(ms(b.scheduling_delay_ms + b.processing_delay_ms), "num"),
    td(int(b.tasks), "num"), td(int(b.task_failures), "num"), td(int(b.dead_letters), "num"),
    td(b.adopted ? "adopted log" : ""))));
  previous = s;
}

function renderShards(s) {
  const rows = [];
  const dt = previous ? (s.now_ms - previous.now_ms) / 1000 : 0;
  for (const input of s.inputs) {
    const before = previous && previous.inputs.find((i) => i.input_id === input.input_id);
    for (const [shard, m] of Object.entries(input.receiver.shards)) {
      const was = before && before.receiver.shards[shard];
      const r = was && dt > 0 ? (m.records_received - was.records_received) / dt : null;
      const owner = m.lease_owner
        ? tag(m.lease_owner, m.owned ? "mine" : "")
        : el("span", { class: "muted" }, m.checkpoint ? "unowned" : "–");
      rows.push(el("tr", {}, td(input.stream), td(shard, "mono"), td(owner), td(m.checkpoint || "–", "wrap"),
        td(int(m.records_received), "num"), td(bytes(m.bytes_received), "num"), td(rate(r), "num"),
        td(ms(m.millis_behind_latest), "num"), td(ms(m.arrival_age_ms), "num"), td(m.latest_stored || "–", "wrap")));
    }
  }
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: "10", class: "muted" }, "no shard read yet")));
  fillRows($("shards").tBodies[0], rows);
}

function renderInputs(s) {
  $("inputs").replaceChildren(...s.inputs.map((input) => {
    const r = input.receiver;
    const dl = el("dl", { class: "facts" });
    const entries = [
      ["checkpoints", `${int(r.checkpoint_successes)} of ${int(r.checkpoint_attempts)} succeeded`],
      ["source throttles", int(r.source_throttles)],
      ["lease-store errors", int(r.lease_store_errors)],
      ["leases taken / lost / released", `${int(r.leases_taken)} / ${int(r.leases_lost)} / ${int(r.leases_released)}`],
      ["rate limit", r.rate_limit === null ? "none" : `${rate(r.rate_limit)} records/s`],
      ["backpressure waits", int(r.backpressure_waits)],
      ["restarts", int(r.restarts)],
    ];
    for (const c of input.source) entries.push([`source: ${c.name}`, int(c.value)]);
    for (const c of input.lease_store) entries.push([`lease store: ${c.name}`, int(c.value)]);
    facts(dl, entries);
    return el("div", { class: "input" }, el("h3", {}, `input ${input.input_id}: ${input.stream}`), dl);
  }));
}

function detectorValue(d) {
  if (d.value === null) return "–";
  return d.name === "high_error_rate" ? `${(d.value * 100).toFixed(1)} %` : ms(d.value);
}

function detectorBound(d) {
  return d.name === "high_error_rate" ? `${(d.bound * 100).toFixed(1)} %` : ms(d.bound);
}

function renderDetectors(s) {
  fillRows($("detectors").tBodies[0], s.detectors.map((d) => el("tr", {},
    td(d.name.replace(/_/g, " ")), td(d.active ? tag("alert", "bad") : tag("ok", "ok")),
    td(detectorValue(d), "num"), td(detectorBound(d), "num"), td(int(d.events), "num"))));
  const events = s.health_events.slice(-10).reverse().map((e) => el("li", {}, e.detector === "stuck_processing"
    ? `${clock(e.batch_time_ms)} stuck processing: total delay ${ms(e.total_delay_ms)} > ${ms(e.bound_ms)}`
    : `${clock(e.batch_time_ms)} high error rate: ${(e.rate * 100).toFixed(1)} % of task attempts failed (> ${(e.bound * 100).toFixed(1)} %)`));
  $("health-events").replaceChildren(...(events.length ? events : [el("li", { class: "muted" }, "none")]));
}

function renderRecovery(s) {
  const r = s.recovery;
  if (!r) {
    facts($("recovery"), [["", el("span", { class: "muted" }, "none since the context was built: the metadata log had no unfinished work")]]);
  } else {
    const what = r.kind === "restart" ? "restart of this worker's log" : `adopted the log of dead worker ${r.worker}`;
    const rerun = r.batches_to_rerun;
    facts($("recovery"), [
      ["what", what],
      ["started", clock(r.started_ms)],
      ["finished", r.finished_ms === null ? "running" : `${clock(r.finished_ms)} (${ms(r.finished_ms - r.started_ms)})`],
      ["batches re-run", `${int(r.batches_rerun)} of ${int(rerun.length)}${rerun.length ? ` (${clock(rerun[0])} … ${clock(rerun[rerun.length - 1])})` : ""}`],
      ["unallocated blocks", int(r.unallocated_blocks)],
      ["blocks replayed", `${int(r.blocks_replayed)} (${int(r.records_replayed)} records)`],
    ]);
  }
  const replays = s.replays.slice().reverse().map((p) => el("tr", {}, td(p.block, "mono"), td(p.ranges, "wrap"),
    td(int(p.records), "num"), td(int(p.millis), "num")));
  fillRows($("replays").tBodies[0], replays.length ? replays : [el("tr", {}, el("td", { colspan: "4", class: "muted" }, "no block replayed"))]);
}

async function poll() {
  setTimeout(poll, POLL_MS);
  let status;
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    status = await response.json();
  } catch (e) {
    $("alerts").replaceChildren(el("div", { class: "alert" }, `Cannot read /api/status (${e.message}): the context may have stopped.`));
    return;
  }
  render(status);
}

poll();
