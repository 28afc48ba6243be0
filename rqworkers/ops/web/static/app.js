// The rqworkers status page. Every value from the server is put in the page as text
// (textContent), never as HTML: a payload holding <script> is shown, never run.
"use strict";

const REFRESH_MS = 2000;
const RATE_SAMPLES = 5; // rates in the queue table: over the last few refreshes
const PAGE = 20; // dead letters per page

const $ = (id) => document.getElementById(id);
const state = {
  session: { actions: false, authenticated: false, csrf: null },
  samples: [], // {t, perPair: Map(pair -> {ok, failed}), workers: Map(id -> {pid, ok, failed})}
  history: { keep: 300, points: [] }, // the chart's: kept by the server, so there at once
  pairs: [],
  // `total`: the count the pager shows, also shown as its queue's dead count (one read).
  dead: { pair: null, start: 0, count: null, total: null, letters: [] },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { status: response.status });
  return body;
}

const pairKey = (p) => `${p.host} ${p.queue}`;
// The counts a worker publishes: `succeeded` (older managers: `handled`) and `failed`.
const counts = (w) => ({ ok: Number(w.succeeded ?? w.handled ?? 0), failed: Number(w.failed ?? 0) });

function bytes(n) {
  n = Number(n || 0);
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(0) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + " KiB";
  return n + " B";
}

function duration(seconds) {
  seconds = Math.max(0, Math.floor(Number(seconds) || 0));
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
  return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
}

// Every time on the page is UTC, as the dead letters' records and the logs are.
function utc(epoch) {
  const date = new Date(Number(epoch) * 1000); // an invalid one (NaN, 1e300) throws in toISOString
  return epoch && Number.isFinite(date.getTime()) ? date.toISOString().replace("T", " ").slice(0, 19) : "?";
}

// -- rates: differences of the workers' counters between refreshes ---------------------

function sample(pairs, t) {
  const previous = state.samples[state.samples.length - 1];
  // Workers publish their counts with every lease renewal (`at`): a reply with no newer
  // renewal (the server's one-second cache, or a refresh between renewals) adds nothing.
  const stamp = pairs.flatMap((p) => (p.snapshot?.workers ?? []).map((w) => `${w.worker_id}@${w.at}`)).sort().join(" ");
  if (previous && previous.stamp === stamp) return;
  const perPair = new Map();
  const workers = new Map();
  for (const pair of pairs) {
    const sum = { ok: 0, failed: 0 };
    for (const w of pair.snapshot?.workers ?? []) {
      const id = `${pairKey(pair)} ${w.worker_id}`;
      const now = { pid: w.pid, ...counts(w) };
      workers.set(id, now);
      const before = previous?.workers.get(id);
      if (!before) continue; // first seen: its past is not this interval's
      const restarted = before.pid !== now.pid || now.ok < before.ok || now.failed < before.failed;
      sum.ok += restarted ? now.ok : now.ok - before.ok;
      sum.failed += restarted ? now.failed : now.failed - before.failed;
    }
    perPair.set(pairKey(pair), sum);
  }
  state.samples.push({ t, stamp, perPair, workers });
  while (state.samples.length > RATE_SAMPLES + 1) state.samples.shift();
}

function rate(key) {
  const recent = state.samples.slice(-RATE_SAMPLES - 1);
  if (recent.length < 2) return null;
  const seconds = (recent[recent.length - 1].t - recent[0].t) / 1000;
  const total = { ok: 0, failed: 0 };
  for (const s of recent.slice(1)) {
    const d = s.perPair.get(key) ?? { ok: 0, failed: 0 };
    total.ok += d.ok;
    total.failed += d.failed;
  }
  return { ok: total.ok / seconds, failed: total.failed / seconds };
}

// -- rendering ------------------------------------------------------------------------

const COLUMNS = 12; // of the queue table
const count = (n) => Number(n ?? 0).toLocaleString("en-US");
const PERIODS = { s: "second", m: "minute", h: "hour" }; // of a rate_limit: "100/s"

function renderQueues(pairs) {
  const body = $("queues").tBodies[0];
  body.replaceChildren(...pairs.flatMap((pair) => {
    const attrs = { "data-host": pair.host, "data-queue": pair.queue };
    const snap = pair.snapshot;
    if (!snap) {
      return [el("tr", { ...attrs, class: "unreachable" },
        el("td", {}, pair.host), el("td", {}, pair.queue), el("td", { colspan: COLUMNS - 2, class: "error" }, pair.error))];
    }
    const r = rate(pairKey(pair));
    const flow = snap.flow ?? {};
    const cell = (name, value) => el("td", { class: `n ${name}` }, value);
    const name = el("td", { class: "queue" }, pair.queue);
    if (flow.paused) {
    const who = `paused by ${flow.paused.by ?? "?"} since ${utc(flow.paused.at)} UTC`;
    name.append(" ", el("span", { class: "badge paused", title: who }, "PAUSED"));
  }
    const row = el("tr", { ...attrs, class: snap.held_back ? "held" : null },
      el("td", { class: "host" }, pair.host), name,
      cell("waiting", snap.waiting), cell("in_flight", snap.in_flight),
      cell("retrying", snap.retrying), cell("next-due", dueIn(snap.next_due)),
      cell("dead", deadCount(pair)),
      cell("ok-rate", r ? r.ok.toFixed(1) : "…"), cell("failed-rate", r ? r.failed.toFixed(1) : "…"),
      cell("running", flow.max_running ? `${flow.running}/${flow.max_running}` : "-"),
      cell("started", flow.rate_limit ? `${flow.started}/${flow.rate_starts}` : "-"),
      el("td", { class: "flow-actions" }, flowButton(pair, flow.paused ? "resume" : "pause")));
    const detail = flowDetail(pair, snap, flow);
    return detail ? [row, detail] : [row];
  }));
}

function flowButton(pair, action) {
  return el("button", { type: "button", class: `flow-action ${action}`, "data-flow": action,
    "data-host": pair.host, "data-queue": pair.queue, hidden: state.session.authenticated ? null : "" },
  action === "pause" ? "Pause" : "Resume");
}

// Why a queue falls behind, said in one line under it: the pause (who, since when) and
// each limit that lets nothing start, with how many messages wait on it; then its busiest
// groups, when it has groups. No line for a queue with nothing to say.
function flowDetail(pair, snap, flow) {
  const why = (flow.held_by ?? []).map((reason) => ({
    paused: `the pause (by ${flow.paused?.by ?? "?"} since ${utc(flow.paused?.at)} UTC)`,
    max_running: `max_running (${flow.running}/${flow.max_running} running)`,
    rate_limit: `rate_limit (${flow.started}/${flow.rate_starts} started in the last ${PERIODS[String(flow.rate_limit).slice(-1)] ?? flow.rate_limit})`,
  })[reason] ?? reason);
  const held = why.length > 0 && (snap.held_back > 0 || Boolean(flow.paused));
  const groups = flow.groups ?? [];
  if (!held && !groups.length) return null;
  const cell = el("td", { colspan: COLUMNS });
  if (held) {
    cell.append(el("p", { class: "held-line" }, `held back by ${why.join(" and ")}: ${count(snap.held_back)} waiting`));
  }
  if (groups.length) {
    const most = Number(flow.group_max_running || 0);
    const rows = groups.map((g) => {
      const full = most > 0 && g.running >= most && g.waiting > 0; // this group falls behind
      return el("tr", { "data-group": g.name, class: full ? "held" : null },
        el("td", { class: "group" }, g.name == null || g.name === "" ? "(default)" : g.name),
        el("td", { class: "n waiting" }, count(g.waiting)), el("td", { class: "n running" }, count(g.running)),
        el("td", { class: "n oldest" }, g.oldest_age == null ? "?" : duration(g.oldest_age)),
        el("td", { class: "note" }, full ? `held back by group_max_running (${g.running}/${most} running)` : ""));
    });
    const limits = [most ? `group_max_running ${most}` : "", flow.group_rate_limit ? `group_rate_limit ${flow.group_rate_limit}` : ""]
      .filter(Boolean).join(", ");
    cell.append(el("table", { class: "groups" },
      el("thead", {}, el("tr", {}, el("th", {}, limits ? `busiest groups (${limits})` : "busiest groups"),
        el("th", { class: "n" }, "waiting"), el("th", { class: "n" }, "running"),
        el("th", { class: "n" }, "oldest waiting"), el("th", {}, ""))),
      el("tbody", {}, ...rows)));
  }
  return el("tr", { class: held ? "flow-detail held" : "flow-detail",
    "data-flow-of": pairKey(pair) }, cell);
}

// "in 3.2s", "1.0s overdue", "in 2h05m"; "-" for nothing scheduled.
function dueIn(epoch) {
  if (epoch === null || epoch === undefined) return "-";
  const left = epoch - Date.now() / 1000;
  const abs = Math.abs(left);
  const span = abs < 60 ? `${abs.toFixed(1)}s`
    : abs < 3600 ? `${Math.floor(abs / 60)}m${String(Math.floor(abs % 60)).padStart(2, "0")}s`
      : `${Math.floor(abs / 3600)}h${String(Math.floor(abs % 3600 / 60)).padStart(2, "0")}m`;
  return left >= 0 ? `in ${span}` : `${span} overdue`;
}

function renderSchedules(schedules) {
  $("schedules-section").hidden = !schedules.length;
  const when = (epoch) => (epoch === null ? "never" : `${utc(epoch)} (${dueIn(epoch)})`);
  $("schedules").tBodies[0].replaceChildren(...schedules.map((s) => el("tr", { "data-name": s.name },
    el("td", { class: "name" }, s.name), el("td", {}, s.queue), el("td", {}, s.rule),
    el("td", {}, s.catch_up), el("td", { class: "last-fire" }, s.error ? s.error : when(s.last_fire)),
    el("td", { class: "next-fire" }, s.error ? "" : when(s.next_fire)))));
}

// The chosen queue's dead count is the pager's: one read, never two numbers at once.
function deadCount(pair) {
  const shown = pairKey(pair) === state.dead.pair && state.dead.total !== null;
  return shown ? state.dead.total : pair.snapshot?.dead;
}

function renderWorkers(pairs) {
  const rows = [];
  for (const pair of pairs) {
    for (const w of pair.snapshot?.workers ?? []) rows.push({ pair, w });
  }
  rows.sort((a, b) => `${a.w.node} ${a.w.name}`.localeCompare(`${b.w.node} ${b.w.name}`));
  const body = $("workers").tBodies[0];
  if (!rows.length) {
    body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 11 }, "no live worker")));
    return;
  }
  body.replaceChildren(...rows.map(({ pair, w }) => {
    const c = counts(w);
    const age = Number(w.current_age || 0);
    return el("tr", { "data-worker": `${w.node}/${w.name}`, "data-queue": pair.queue },
      el("td", { class: "name" }, w.name ?? w.worker_id), el("td", { class: "node" }, w.node ?? "?"),
      el("td", {}, pair.queue), el("td", { class: "n pid" }, w.pid ?? "?"),
      el("td", { class: `state state-${w.state}` }, w.state ?? "?"),
      el("td", { class: "n" }, age ? `${age.toFixed(1)}s` : "-"), el("td", { class: "n" }, bytes(w.rss)),
      el("td", { class: "n" }, w.since ? duration(Number(w.at) - Number(w.since)) : "?"),
      el("td", { class: "n succeeded" }, c.ok), el("td", { class: "n failed" }, c.failed),
      el("td", {}, w.last_exit || "-"));
  }));
}

function renderChart() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const points = state.history.points.map((p) => ({ t: p.t * 1000, ok: p.ok, failed: p.failed }));
  const keep = state.history.keep * 1000;
  const top = Math.max(1, ...points.map((p) => Math.max(p.ok, p.failed)));
  const end = points.length ? points[points.length - 1].t : 0;
  const last = points.length ? `, last ${utc(end / 1000).slice(11)} UTC` : "";
  $("chart-scale").textContent = `(top: ${top.toFixed(1)}/s; a line every minute, now on the right${last})`;
  canvas.dataset.points = points.length;
  const x = (t) => width - ((end - t) / keep) * width;
  const y = (v) => height - 4 - (v / top) * (height - 12);
  ctx.strokeStyle = "#e3e5ea";
  ctx.lineWidth = 1;
  for (let minute = 1; minute < keep / 60000; minute++) { // a line a minute back
    ctx.beginPath();
    ctx.moveTo(x(end - minute * 60000), 0);
    ctx.lineTo(x(end - minute * 60000), height);
    ctx.stroke();
  }
  for (const [field, color] of [["ok", "#2a7"], ["failed", "#c33"]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p[field])) : ctx.moveTo(x(p.t), y(p[field]))));
    ctx.stroke();
  }
}

function renderDeadChoices(pairs) {
  const select = $("dead-queue");
  const keys = pairs.map(pairKey);
  const current = [...select.options].map((o) => o.value);
  if (keys.join("\n") !== current.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...pairs.map((p) => el("option", { value: pairKey(p) }, `${p.queue} on ${p.host}`)));
    // Until someone chooses, show the first queue that has dead letters.
    const first = pairs.find((p) => p.snapshot?.dead);
    if (keys.includes(chosen)) select.value = chosen;
    else if (first) select.value = pairKey(first);
  }
  state.pairs = pairs;
}

function renderDead(page) {
  const body = $("dead").tBodies[0];
  const first = page.total ? page.start + 1 : 0;
  $("dead-count").textContent = `${first}–${page.start + page.letters.length} of ${page.total}, newest first`;
  state.dead.total = page.total;
  const row = [...$("queues").tBodies[0].rows].find((r) => state.dead.pair === `${r.dataset.host} ${r.dataset.queue}`);
  const cell = row?.querySelector("td.dead");
  if (cell) cell.textContent = page.total;
  $("dead-prev").disabled = page.start === 0;
  $("dead-next").disabled = page.start + page.letters.length >= page.total;
  if (!page.letters.length) {
    body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 9 }, "no dead letter")));
    return;
  }
  const known = new Set(["reason", "attempts", "at", "worker", "traceback"]);
  body.replaceChildren(...page.letters.map((letter) => {
    const info = letter.info || {};
    const reason = el("td", { class: "reason" }, info.reason ?? "reason unknown");
    if (info.traceback) reason.append(el("details", {}, el("summary", {}, "traceback"), el("pre", {}, info.traceback)));
    const extra = Object.entries(info).filter(([k]) => !known.has(k));
    if (extra.length) {
      reason.append(el("div", { class: "extra" }, extra.map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")));
    }
    const pick = el("input", { type: "checkbox", "data-index": letter.index, "data-key": letter.key, "aria-label": `select dead letter ${letter.index}` });
    return el("tr", { "data-index": letter.index },
      el("td", { class: "pick" }, pick), el("td", { class: "n" }, letter.index), el("td", { class: "n" }, letter.size),
      el("td", { class: "preview" }, letter.preview), el("td", { class: "n attempts" }, info.attempts ?? "?"),
      reason, el("td", { class: "at" }, utc(info.at)),
      // As the workers table names it; a worker no longer live keeps its stored id.
      el("td", { class: "worker" }, letter.worker?.name ?? letter.worker?.id ?? "?"),
      el("td", { class: "node" }, letter.worker?.node ?? "?"));
  }));
}

function renderSession() {
  const s = state.session;
  $("read-only").hidden = s.actions;
  $("login").hidden = !s.actions || s.authenticated;
  $("logout").hidden = !s.authenticated;
  $("private").hidden = !s.private || s.authenticated;
  $("dead-actions").hidden = !s.authenticated;
  for (const button of document.querySelectorAll("#queues .flow-action")) button.hidden = !s.authenticated;
  for (const cell of document.querySelectorAll("#dead .pick")) cell.hidden = !s.authenticated;
}

// -- loading --------------------------------------------------------------------------

async function loadDead() {
  const pair = state.pairs.find((p) => pairKey(p) === $("dead-queue").value);
  if (!pair) return;
  const query = new URLSearchParams({ host: pair.host, queue: pair.queue, start: state.dead.start, limit: PAGE });
  try {
    const page = await api(`api/dead?${query}`);
    state.dead.letters = page.letters;
    renderDead(page);
    renderSession();
  } catch (error) {
    state.dead.letters = [];
    state.dead.total = null;
    $("dead").tBodies[0].replaceChildren();
    $("dead-count").textContent = `cannot read dead letters: ${error.message}`;
  }
}

let refreshing = false; // one refresh at a time, however slow Redis is

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const [pairs, history, schedules] = await Promise.all(
      [api("api/status"), api("api/history"), api("api/schedules")]);
    renderSchedules(schedules);
    sample(pairs, Date.now());
    state.history = history;
    renderDeadChoices(pairs);
    if (state.dead.pair !== $("dead-queue").value) state.dead.total = null;
    renderQueues(pairs);
    renderWorkers(pairs);
    renderChart();
    const chosen = pairs.find((p) => pairKey(p) === $("dead-queue").value);
    const count = chosen?.snapshot?.dead ?? null;
    // Dead letters are read again only when their count (or the chosen queue) changes.
    if (state.dead.pair !== $("dead-queue").value || state.dead.count !== count) {
      state.dead.pair = $("dead-queue").value;
      state.dead.count = count;
      await loadDead();
    }
    $("refreshed").textContent = `updated ${utc(Date.now() / 1000).slice(11)} UTC`;
    $("refreshed").classList.remove("error");
  } catch (error) {
    $("refreshed").textContent = `cannot refresh: ${error.message}`;
    $("refreshed").classList.add("error");
  } finally {
    refreshing = false;
  }
}

async function loadSession() {
  const was = state.session.authenticated;
  state.session = await api("api/session");
  if (was !== state.session.authenticated) state.dead.count = null; // private letters: read again
  $("node").textContent = `served by node ${state.session.node}`;
  renderSession();
}

async function act(action) {
  const pair = state.pairs.find((p) => pairKey(p) === $("dead-queue").value);
  const letters = [...document.querySelectorAll("#dead input[type=checkbox]:checked")]
    .map((box) => ({ index: Number(box.dataset.index), key: box.dataset.key }));
  const message = $("dead-message");
  message.classList.remove("error");
  if (!pair || !letters.length) {
    message.textContent = "select dead letters first";
    return;
  }
  if (action === "purge" && !window.confirm(`Delete ${letters.length} dead letter(s) for good?`)) return;
  try {
    const result = await api(`api/dead/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf ?? "" },
      body: JSON.stringify({ host: pair.host, queue: pair.queue, letters }),
    });
    message.textContent = `${action === "requeue" ? "requeued" : "purged"} ${result.done} of ${result.asked}`;
  } catch (error) {
    message.textContent = `${action} refused (${error.status ?? "?"}): ${error.message}`;
    message.classList.add("error");
  }
  state.dead.count = null; // read the letters again at once
  await refresh();
}

async function flowAction(action, host, queue) {
  const message = $("flow-message");
  message.classList.remove("error");
  try {
    const result = await api(`api/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf ?? "" },
      body: JSON.stringify({ host, queue }),
    });
    const already = action === "pause" ? "was paused already" : "was not paused";
    message.textContent = `${result.queue} ${result.done ? `${action}d` : already}`;
  } catch (error) {
    message.textContent = `${action} refused (${error.status ?? "?"}): ${error.message}`;
    message.classList.add("error");
  }
  await refresh();
}

function start() {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new URLSearchParams(new FormData(event.target));
    event.target.reset();
    const response = await fetch("login", { method: "POST", body: form, credentials: "same-origin" });
    const refusal = response.status === 429 ? "too many wrong tokens: wait and try again" : "wrong token";
    $("login-error").textContent = response.ok ? "" : refusal;
    await loadSession();
  });
  $("logout").addEventListener("submit", async (event) => {
    event.preventDefault();
    await fetch("logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": state.session.csrf ?? "" } });
    await loadSession();
  });
  $("requeue").addEventListener("click", () => act("requeue"));
  $("purge").addEventListener("click", () => act("purge"));
  $("queues").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-flow]");
    if (button) flowAction(button.dataset.flow, button.dataset.host, button.dataset.queue);
  });
  $("dead-queue").addEventListener("change", () => { state.dead.start = 0; refresh(); });
  $("dead-prev").addEventListener("click", () => { state.dead.start = Math.max(0, state.dead.start - PAGE); loadDead(); });
  $("dead-next").addEventListener("click", () => { state.dead.start += PAGE; loadDead(); });
  loadSession().catch((error) => { $("node").textContent = `session: ${error.message}`; });
  refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
