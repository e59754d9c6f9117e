// The edgetune status page: polls /status every 2 s (charts keep a rolling window), /models and
// /cycles when a cycle changes state (and every 10 s). No libraries: everything ships with the daemon.
"use strict";

const POLL_MS = 2000;
const LIST_EVERY = 5;          // polls between /models and /cycles refreshes
const WINDOW = 180;            // chart points kept (6 minutes at 2 s)
const FINAL = ["accepted", "rejected", "failed", "aborted"];
const TOKEN_KEY = "edgetune.token";

const $ = (id) => document.getElementById(id);
const series = { temperature: [], power: [], cpu: [], gpu: [], memory: [] };
let polls = 0;
let lastCycleKey = null;
let models = [];

// ---- helpers -------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

const num = (v) => typeof v === "number" && isFinite(v);
function si(v) {
  if (!num(v)) return "–";
  const units = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [div, u] of units) if (Math.abs(v) >= div) return (v / div).toFixed(2) + " " + u;
  return String(Math.round(v));
}
function bytes(v) {
  if (!num(v)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return v.toFixed(i ? 1 : 0) + " " + units[i];
}
const pct = (v) => (num(v) ? (100 * v).toFixed(1) + "%" : "–");
const when = (t) => (num(t) ? new Date(t * 1000).toLocaleString() : "–");
function duration(s) {
  if (!num(s)) return "–";
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return (s / 3600).toFixed(1) + " h";
}
function pill(text, cls) { return el("span", { class: "pill " + (cls || text) }, text); }

function setMessage(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind || "";
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : resp.statusText;
    throw new Error(detail + " (HTTP " + resp.status + ")");
  }
  return data;
}

// ---- charts --------------------------------------------------------------------------------
// lines: [{name, color, points: [[t, v]]}], limits: [{value, name, color}]
function drawChart(svg, lines, limits, unit) {
  const W = 360, H = 150, L = 34, R = 8, T = 22, B = 18, MIN_SPAN = 60;
  svg.replaceChildren();
  const values = lines.flatMap((l) => l.points.map((p) => p[1])).concat(limits.map((l) => l.value)).filter(num);
  const times = lines.flatMap((l) => l.points.map((p) => p[0]));
  if (!values.length || !times.length) {
    svg.append(Object.assign(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }), { textContent: "no readings" }));
    return;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.1;
  lo = Math.max(lo >= 0 ? 0 : -Infinity, lo - pad); hi += pad;
  // the data so far, at least MIN_SPAN seconds wide, at most the rolling window
  const t1 = Math.max(...times), t0 = Math.min(t1 - MIN_SPAN, Math.max(Math.min(...times), t1 - WINDOW * POLL_MS / 1000));
  const x = (t) => L + (W - L - R) * (t - t0) / Math.max(1e-9, t1 - t0);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#cfd8dc" }));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    svg.append(Object.assign(svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }), { textContent: v.toFixed(hi - lo < 10 ? 1 : 0) }));
    svg.append(svgEl("line", { x1: L, y1: y(v), x2: W - R, y2: y(v), stroke: "#eceff1" }));
  }
  svg.append(Object.assign(svgEl("text", { x: L, y: H - 4 }), { textContent: "−" + Math.round(t1 - t0) + " s" }));
  svg.append(Object.assign(svgEl("text", { x: W - R, y: H - 4, "text-anchor": "end" }), { textContent: "now" }));
  for (const lim of limits.filter((l) => num(l.value))) {
    svg.append(svgEl("line", { x1: L, y1: y(lim.value), x2: W - R, y2: y(lim.value), stroke: lim.color, "stroke-dasharray": "5 3" }));
    svg.append(Object.assign(svgEl("text", { x: W - R - 2, y: y(lim.value) - 3, "text-anchor": "end", style: "fill:" + lim.color }),
      { textContent: lim.name + " " + lim.value + unit }));
  }
  let legendX = L + 4;
  for (const line of lines) {
    const pts = line.points.filter((p) => num(p[1]));
    if (!pts.length) continue;
    svg.append(svgEl("polyline", { points: pts.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" "), fill: "none", stroke: line.color, "stroke-width": 1.8 }));
    const last = pts[pts.length - 1][1];
    const label = Object.assign(svgEl("text", { x: legendX, y: 13, style: "fill:" + line.color + ";font-weight:600" }),
      { textContent: line.name + " " + last.toFixed(1) + unit });
    svg.append(label);
    legendX += 92;
  }
}

function pushReading(tel) {
  const t = Date.now() / 1000;
  const add = (key, v) => {
    series[key].push([t, num(v) ? v : null]);
    if (series[key].length > WINDOW) series[key].shift();
  };
  add("temperature", tel.max_temperature_c);
  add("power", tel.power_w);
  add("cpu", tel.cpu_load);
  add("gpu", tel.gpu_load);
  add("memory", tel.memory_used);
  const lim = tel.limits || {};
  drawChart($("chart-temperature"), [{ name: "hottest", color: "#e53935", points: series.temperature }],
    [{ value: lim.thermal_limit_c, name: "limit", color: "#c62828" }], "°C");
  drawChart($("chart-power"), [{ name: "board", color: "#8e24aa", points: series.power }],
    [{ value: lim.power_budget_w, name: "budget", color: "#6a1b9a" }], " W");
  drawChart($("chart-load"), [
    { name: "CPU", color: "#1e88e5", points: series.cpu },
    { name: "GPU", color: "#43a047", points: series.gpu },
    { name: "mem", color: "#90a4ae", points: series.memory },
  ], [
    { value: lim.max_cpu_load, name: "CPU max", color: "#1565c0" },
    { value: lim.max_gpu_load, name: "GPU max", color: "#2e7d32" },
  ], "%");
}

// ---- panels --------------------------------------------------------------------------------
// a labelled horizontal bar; `limit` bars turn orange when nearly full
function bar(label, value, max, text, limit = true) {
  const share = num(value) && num(max) && max > 0 ? Math.min(1, value / max) : 0;
  return el("div", { class: "bar" },
    el("div", { class: "label" }, el("span", {}, label), el("span", {}, text)),
    el("div", { class: "track" }, el("div", { class: "fill" + (limit && share > 0.9 ? " high" : ""), style: "width:" + (100 * share).toFixed(1) + "%" })));
}

function renderModel(model) {
  $("served-version").textContent = model ? model.version : "no model";
  $("served-detail").textContent = model
    ? model.arch + " · " + si(model.params) + " params · " + si(model.macs) + " MACs · " + model.device + servingText(model.serving) : "";
}

// the backend serving the model and its batch-1 forward time; why the others do not serve is in the tooltip
function servingText(serving) {
  if (!serving) return "";
  const why = Object.entries(serving.skipped || {}).map(([b, reason]) => b + ": " + reason).join("\n");
  $("served-detail").title = why;
  const building = serving.rebuild && serving.rebuild.building ? " (building " + serving.rebuild.building.backends.join(", ") + ")" : "";
  return " · " + serving.backend + " " + serving.latency_ms.toFixed(2) + " ms" + building;
}

function renderGate(sched) {
  const gate = $("gate-state");
  gate.replaceWith(Object.assign(pill(sched.gate_open ? "open" : "closed"), { id: "gate-state" }));
  $("scheduler-state").textContent = "scheduler: " + sched.state + (sched.auto_cycles ? " · periodic cycles on" : " · periodic cycles off")
    + (num(sched.seconds_since_inference) ? " · last inference " + sched.seconds_since_inference.toFixed(0) + " s ago" : "");
  $("gate-conditions").replaceChildren(...["idle", "load_ok", "thermal_ok", "power_ok", "samples_ok"].map(
    (c) => el("li", {}, pill(c.replace("_ok", ""), sched[c] ? "ok" : "bad"))));
  $("gate-reasons").replaceChildren(...(sched.why_not_running || []).map((r) => el("li", {}, r)));
}

// "predicted 812 MiB peak, 4 min 3 s (batch 32, full) · actual 790 MiB, 3 min 50 s"
function costLine(cost) {
  if (!cost || (!cost.predicted && !cost.note)) return null;
  const pr = cost.predicted, ac = cost.actual;
  let text = pr ? "predicted " + bytes(pr.peak_mb * 1048576) + " peak, " + duration(pr.duration_s) + " (batch " + pr.batch_size + ", " + pr.scope + ")" : cost.note;
  if (pr && cost.budget_mb) text += " of " + cost.budget_mb + " MiB budget";
  if (ac) text += " · " + (ac.complete === false ? "spent before it stopped " : "actual ")
    + (num(ac.peak_mb) ? bytes(ac.peak_mb * 1048576) + ", " : "") + duration(ac.duration_s);
  return text;
}

// "retrain 3 min 2 s → 2 min 50 s · prune 4 s → 5 s · ...": predicted → actual per phase of the cycle
function phaseLine(cost) {
  const pr = cost && cost.predicted && cost.predicted.phases, ac = cost && cost.actual && cost.actual.phases;
  if (!pr && !ac) return null;
  const names = Object.keys(pr || ac).filter((k) => (pr && pr[k] > 0) || (ac && ac[k] > 0));
  return names.map((k) => k + " " + (pr ? duration(pr[k]) : "–") + (ac ? " → " + duration(ac[k]) : "")).join(" · ") || null;
}

function renderCycle(cycle) {
  const box = $("cycle-now");
  if (!cycle) { box.replaceChildren(el("p", { class: "muted" }, "no cycle yet")); return; }
  const running = !FINAL.includes(cycle.state);
  const p = cycle.progress || {};
  const rows = [
    ["cycle", cycle.id], ["state", pill(cycle.state)], ["trigger", cycle.trigger + (cycle.forced ? " (forced)" : "")],
  ];
  if (running) {
    rows.push(["step", cycle.step || "–"]);
    if (num(p.loss)) rows.push(["training", "epoch " + p.epoch + ", batch " + p.batch + "/" + p.batches_per_epoch + ", loss " + p.loss.toFixed(3)]);
    if (cycle.probes && cycle.probes.length) rows.push(["probes", cycle.probes.map((q) => q.level + "→" + pct(q.accuracy)).join(", ")]);
  } else {
    rows.push(["finished", when(cycle.finished)]);
  }
  const cost = costLine(cycle.cost);
  if (cost) rows.push(["cost", cost]);
  const phases = phaseLine(cycle.cost);
  if (phases) rows.push(["cost by phase", phases]);
  if (cycle.reason) rows.push([running ? "waiting on" : "reason", cycle.reason]);
  box.replaceChildren(el("dl", {}, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
  if (running && num(p.batch) && num(p.batches_per_epoch)) box.append(bar("epoch " + p.epoch, p.batch, p.batches_per_epoch, p.batch + "/" + p.batches_per_epoch));
}

function renderBuffer(buf) {
  $("buffer-fill").replaceChildren(
    bar("samples", buf.samples, buf.max_rows, buf.samples + " / " + buf.max_rows),
    bar("bytes", buf.bytes, buf.max_bytes, bytes(buf.bytes) + " / " + bytes(buf.max_bytes)),
    el("p", { class: "muted" }, buf.labelled + " labelled · " + buf.held_out + " held out · " + buf.evicted + " evicted"));
  const entries = Object.entries(buf.per_class || {}).sort((a, b) => b[1] - a[1]);
  const most = entries.length ? entries[0][1] : 0;
  $("per-class").replaceChildren(...(entries.length ? entries.map(([name, n]) => bar(name, n, most, String(n), false))
    : [el("p", { class: "muted" }, "empty")]));
}

// the class prior the daemon estimates from the current scene's traffic (EM), beside what the served model assumes,
// whether answers are corrected to it and why, and the change detector's last change
function renderPrior(shift) {
  const state = $("prior-state");
  if (!shift) { state.replaceWith(Object.assign(pill("no model", "closed"), { id: "prior-state" })); return; }
  state.replaceWith(Object.assign(pill(shift.applied ? "correcting" : "not correcting", shift.applied ? "ok" : "closed"), { id: "prior-state" }));
  const spots = shift.spot_check || {};
  const change = shift.last_change;
  $("prior-reason").textContent = (shift.reason || "answers are corrected to the estimate") + " · " + shift.samples + " answers in this scene"
    + (change ? " · scene changed " + change.answers_ago + " answers ago (" + shift.changes + " changes since start)" : " · no scene change seen")
    + (spots.labelled ? " · spot checks: " + spots.correct_corrected + " / " + spots.labelled + " right corrected, " + spots.correct_raw + " uncorrected" : "");
  const entries = Object.entries(shift.estimate || {}).sort((a, b) => b[1] - a[1]).filter(([, v]) => v >= 0.01);
  $("prior-estimate").replaceChildren(...(entries.length
    ? entries.map(([name, v]) => bar(name, v, 1, pct(v) + " (model assumes " + pct(shift.source_prior[name]) + ")", false))
    : [el("p", { class: "muted" }, "no estimate yet")]));
}

function renderModels() {
  const active = models.find((m) => m.active);
  const stored = new Set(models.map((m) => m.version));
  const parent = active && active.lineage.parent;
  const back = $("roll-back");
  back.disabled = !(parent && stored.has(parent));
  back.textContent = back.disabled ? "Roll back" : "Roll back to " + parent;
  back.title = back.disabled ? "the served model's parent is not stored" : "serve " + parent + " again";
  $("models-body").replaceChildren(...models.map((m) => {
    const lin = m.lineage || {}, met = lin.metrics || {};
    const action = m.active ? pill("serving", "ok")
      : el("button", { class: "small secondary activate", "data-version": m.version, onclick: () => activate(m.version) }, "Activate");
    return el("tr", { class: m.active ? "active" : "" },
      el("td", {}, m.version), el("td", {}, lin.parent || "–"),
      el("td", {}, lin.criterion ? lin.criterion + " / " + (num(lin.level) ? lin.level.toFixed(2) : lin.level) : "base"),
      el("td", {}, si(m.params)), el("td", {}, si(m.macs)), el("td", {}, pct(met.top1_after)),
      el("td", {}, lin.created ? new Date(lin.created).toLocaleString() : "–"), el("td", {}, action));
  }));
}

function renderCycles(cycles) {
  $("cycles-body").replaceChildren(...cycles.map((c) => {
    const m = c.metrics || {};
    const dur = num(c.started) && num(c.finished) ? c.finished - c.started : null;
    const report = FINAL.includes(c.state) ? el("a", { href: "/cycles/" + encodeURIComponent(c.id) + "/report.png", target: "_blank" }, "report") : "";
    return el("tr", { "data-cycle": c.id },
      el("td", {}, when(c.created)), el("td", {}, c.id), el("td", {}, c.trigger), el("td", {}, pill(c.state)),
      el("td", {}, duration(dur)),
      el("td", {}, num(m.params_before) ? si(m.params_before) + " → " + si(m.params_after) : "–"),
      el("td", {}, num(m.top1_before) || num(m.top1_after) ? pct(m.top1_before) + " → " + pct(m.top1_after) : "–"),
      el("td", { class: "reason" }, c.reason || ""), el("td", {}, report));
  }));
}

// a pending candidate's disagreements: one click per image posts its class (POST /samples/{id}/label)
let shownAsked = null;
async function refreshDisagreements(cycle) {
  const box = $("disagreements");
  if (!cycle || cycle.state !== "pending") { box.hidden = true; shownAsked = null; return; }
  let body;
  try {
    body = await api("GET", "/cycles/" + encodeURIComponent(cycle.id) + "/disagreements");
  } catch (err) {  // the cycle ended between the two requests: the next poll shows it
    box.hidden = true; shownAsked = null; return;
  }
  box.hidden = false;
  const done = body.asked.filter((a) => a.label !== null).length;
  $("disagreements-count").textContent = done + " / " + body.asked.length + " labelled · " + body.disagreements + " disagreements in " + body.judging_samples;
  const key = cycle.id + ":" + body.asked.map((a) => a.label).join(",");
  if (key === shownAsked) return;
  shownAsked = key;
  $("disagreements-grid").replaceChildren(...body.asked.map((a) => el("div", { class: "asked" + (a.label !== null ? " done" : ""), "data-sample": a.sample_id },
    el("img", { src: a.image_url, alt: "sample " + a.sample_id }),
    el("div", {}, "served: " + a.teacher + " · candidate: " + a.candidate),
    el("div", { class: "classes" }, body.classes.map((name) => el("button", {
      type: "button", class: "small" + (a.label === name ? " chosen" : " secondary"), "data-class": name,
      onclick: () => giveLabel(a.sample_id, name),
    }, name))))));
}

async function giveLabel(sampleId, name) {
  try {
    await api("POST", "/samples/" + sampleId + "/label", { label: name });
    setMessage("sample " + sampleId + " labelled " + name, "ok");
  } catch (err) {
    setMessage("label refused: " + err.message, "error");
  }
  await poll();
}

// ---- polling and actions ---------------------------------------------------------------------
async function refreshLists() {
  const [m, c] = await Promise.all([api("GET", "/models"), api("GET", "/cycles?limit=30")]);
  models = m;
  renderModels();
  renderCycles(c);
}

async function poll() {
  try {
    const st = await api("GET", "/status");
    $("connection").replaceWith(Object.assign(pill("live"), { id: "connection" }));
    renderModel(st.model);
    renderGate(st.scheduler);
    renderCycle(st.cycle);
    await refreshDisagreements(st.cycle);
    renderBuffer(st.buffer);
    renderPrior(st.label_shift);
    $("provider").textContent = "(" + st.telemetry.provider + ")";
    pushReading(st.telemetry);
    const key = st.cycle ? st.cycle.id + ":" + st.cycle.state : "";
    const served = st.model ? st.model.version : "";
    if (key + served !== lastCycleKey || polls % LIST_EVERY === 0) {
      lastCycleKey = key + served;
      await refreshLists();
    }
  } catch (err) {
    $("connection").replaceWith(Object.assign(pill("unreachable", "down"), { id: "connection", title: String(err) }));
  }
  polls++;
}

async function pruneNow() {
  setMessage("starting a cycle…");
  try {
    const r = await api("POST", "/prune", {});
    setMessage("cycle " + r.cycle_id + " " + r.state, "ok");
  } catch (err) {
    setMessage("prune refused: " + err.message, "error");
  }
  await poll();
  await refreshLists();
}

async function activate(version) {
  setMessage("activating " + version + "…");
  try {
    const r = await api("POST", "/models/" + encodeURIComponent(version) + "/activate");
    setMessage("now serving " + r.active, "ok");
  } catch (err) {
    setMessage("activate refused: " + err.message, "error");
  }
  await poll();
  await refreshLists();
}

function init() {
  const token = $("token");
  token.value = localStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("input", () => {
    if (token.value) localStorage.setItem(TOKEN_KEY, token.value);
    else localStorage.removeItem(TOKEN_KEY);
  });
  $("prune-now").addEventListener("click", pruneNow);
  $("roll-back").addEventListener("click", () => {
    const active = models.find((m) => m.active);
    if (active && active.lineage.parent) activate(active.lineage.parent);
  });
  poll();
  setInterval(poll, POLL_MS);
}

init();
