// ladle dashboard: plain JavaScript, no build step, no external assets (served from the binary).
//
// Data: the REST API (/v1/merges, /v1/analyses) and, for live updates, the event streams
// (GET /v1/events: `event: state`, data = one list item plus "kind"; GET /v1/{merges|analyses}/{id}/events:
// `state` (job view), `progress` ({phase, tensors_done, tensors_total, bytes_read, bytes_written},
// plus `search`), `done` (terminal view)). Streams are read with fetch() and a small SSE parser so
// the bearer token can be sent (EventSource cannot send an Authorization header); a broken
// stream is retried with `Last-Event-ID`, and only while it is down does the page poll the REST
// endpoints. The header shows which is live; `window.__ladleLive` counts what came how. The
// token is entered once and kept in sessionStorage.
"use strict";

const TOKEN_KEY = "ladle.token";
const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
const POLL_MS = 1500;
const $ = (sel, root = document) => root.querySelector(sel);

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log10(n) / 3));
  return `${(n / 10 ** (3 * i)).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function when(ts) {
  return ts ? new Date(ts).toLocaleString() : "";
}

function flash(msg) {
  const f = $("#flash");
  f.textContent = msg;
  f.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { f.hidden = true; }, 4000);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra = {}) {
  const h = { ...extra };
  if (token()) h.Authorization = `Bearer ${token()}`;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.requestId = body && body.request_id;
  }
}

async function api(path, opts = {}) {
  const resp = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!resp.ok) {
    if (resp.status === 401) showTokenNeeded();
    throw new ApiError(resp.status, body);
  }
  return body;
}

function errorBox(err) {
  return el("div", { class: "error-box", role: "alert" },
    err.code ? el("code", { text: err.code }) : null,
    err.code ? ": " : null,
    err.message,
    err.requestId ? el("div", { class: "muted", text: `request id ${err.requestId}` }) : null);
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}`, "data-state": state, text: state });
}

function progressBar(p, state) {
  const done = p ? p.tensors_done || 0 : 0;
  const total = p ? p.tensors_total || 0 : 0;
  const pct = total ? Math.min(100, (100 * done) / total) : state === "succeeded" ? 100 : 0;
  const bar = el("div", { class: `bar${state === "succeeded" ? " done" : ""}`, role: "progressbar",
    "aria-valuenow": Math.round(pct), "aria-valuemin": 0, "aria-valuemax": 100 });
  const fill = el("span");
  fill.style.width = `${pct}%`;
  bar.append(fill);
  return bar;
}

function progressLabel(p) {
  if (!p) return "";
  const phase = p.phase ? `${p.phase} · ` : "";
  return `${phase}${p.tensors_done || 0}/${p.tensors_total || 0} tensors · ${bytes(p.bytes_read)} read · ${bytes(p.bytes_written)} written`;
}

function methodOf(job) {
  if (job.kind === "analysis") return "analysis";
  const method = (job.recipe && job.recipe.method) || "";
  // A search is stored as the soup it searches within plus `search` (greedy, sweep).
  const search = job.recipe && job.recipe.search && job.recipe.search.kind;
  if (search === "greedy") return `greedy_soup (${method})`;
  if (search) return `${search} (${method})`;
  return method;
}

// ---------- event streams over fetch (text/event-stream) ----------

// How this tab gets its updates, for the header and for tests (read over WebDriver):
// `mode` of the view on screen ("stream", "poll", "done" once a job stream ended, "offline"),
// and counters over the tab's life: events received over streams (by name), fallback polls,
// stream (re)connections, and the last event id received.
const liveStats = {
  mode: "offline", streamEvents: 0, byEvent: {}, polls: 0, connects: 0, reconnects: 0,
  lastEventId: null,
};
window.__ladleLive = liveStats;

// Splits a text/event-stream into events (the WHATWG rules that matter here: `event:`,
// `data:` (joined with newlines), `id:`, `:` comments, a blank line dispatches, CR, LF and
// CRLF line ends, even split across chunks; `retry:` is ignored: `live` has its own backoff).
// A small state machine fed with decoded text chunks.
class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buf = "";
    this.pendingCr = false;
    this.reset();
  }
  reset() { this.name = ""; this.data = []; this.id = null; }
  push(text) {
    if (this.pendingCr && text.startsWith("\n")) text = text.slice(1);
    this.pendingCr = text.endsWith("\r");
    this.buf += text;
    const lines = this.buf.split(/\r\n|\r|\n/);
    this.buf = lines.pop();
    for (const line of lines) this.line(line);
  }
  line(line) {
    if (line === "") {
      if (this.data.length) this.onEvent(this.name || "message", this.data.join("\n"), this.id);
      this.reset();
      return;
    }
    if (line.startsWith(":")) return;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") this.name = val;
    else if (field === "data") this.data.push(val);
    else if (field === "id" && !val.includes("\0")) this.id = val;
  }
}

// Reads one SSE response: `onOpen()` once the server answered with a stream, then
// `onEvent(name, data, id)` per event whose data is JSON. Resolves "ended" when the stream
// ends, "finished" on 204 (a resumed job stream whose job had already finished); rejects
// when it cannot be opened (401, 404, not a stream, network) or breaks.
async function readEvents(path, lastEventId, onOpen, onEvent, signal) {
  const h = { Accept: "text/event-stream" };
  if (lastEventId) h["Last-Event-ID"] = lastEventId;
  const resp = await fetch(path, { headers: headers(h), signal, cache: "no-store" });
  if (resp.status === 204) return "finished";
  if (!resp.ok || !resp.body) throw new ApiError(resp.status, null);
  const ctype = resp.headers.get("content-type") || "";
  if (!ctype.startsWith("text/event-stream")) throw new Error(`not an event stream: ${ctype}`);
  await onOpen();
  const parser = new SseParser((name, data, id) => {
    let parsed;
    try { parsed = JSON.parse(data); } catch (_) { return; }
    onEvent(name, parsed, id);
  });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return "ended";
    parser.push(value);
  }
}

const sleep = (ms, timers) => new Promise((r) => { timers.t = setTimeout(r, ms); });

// Keeps a view live from the event stream at `path`; `poll()` re-reads the view over REST.
// - The stream is the normal path. Once it is open, `poll()` runs once (`resync`, for what
//   changed before the stream started; the per-job streams send the job on connect and skip it).
// - When the stream cannot be opened or breaks, the view is polled every POLL_MS while the
//   stream is retried (1 s, doubling to 15 s), resuming with `Last-Event-ID`; once it is back,
//   polling stops.
// - A job stream ends after its `done` event (or answers 204 when resumed after the end): one
//   last read, and nothing more to follow.
// Returns a stop function.
function live(path, onEvent, poll, { resync = true, final = null } = {}) {
  const ctl = new AbortController();
  const timers = {}, pollTimers = {};
  let stopped = false, polling = false, lastId = null, lastName = null, failures = 0;
  const setLive = (mode) => {
    liveStats.mode = mode;
    const l = $("#live");
    l.textContent = mode === "stream" ? "live (event stream)"
      : mode === "poll" ? `live (polling every ${POLL_MS / 1000} s; stream unavailable)`
      : mode === "done" ? "finished (stream closed)" : "offline";
    l.className = `live ${mode}`;
    l.dataset.mode = mode;
  };
  // One polling loop at a time: a loop stops when `round` moved on.
  let round = 0;
  const startPolling = () => {
    if (polling) return;
    polling = true;
    const mine = ++round;
    setLive("poll");
    (async () => {
      while (mine === round && !stopped) {
        liveStats.polls += 1;
        try { await poll("poll"); } catch (e) { if (e.status !== 401) console.warn(e); }
        if (mine !== round) break;
        await sleep(POLL_MS, pollTimers);
      }
    })();
  };
  const stopPolling = () => {
    if (polling) round += 1;
    polling = false;
    clearTimeout(pollTimers.t);
  };
  (async () => {
    while (!stopped) {
      let outcome;
      try {
        outcome = await readEvents(path, lastId, async () => {
          liveStats.connects += 1;
          failures = 0;
          stopPolling();
          // Events wait in the response until this returns: the resync cannot overwrite them.
          if (resync) { try { await poll("sync"); } catch (e) { console.warn(e); } }
          if (!stopped) setLive("stream");
        }, (name, data, id) => {
          if (stopped) return;
          if (id) { lastId = id; liveStats.lastEventId = id; }
          lastName = name;
          liveStats.streamEvents += 1;
          liveStats.byEvent[name] = (liveStats.byEvent[name] || 0) + 1;
          onEvent(name, data);
        }, ctl.signal);
      } catch (e) {
        if (stopped) return;
        outcome = e;
      }
      if (stopped) return;
      if (outcome === "finished" || (final && lastName === final)) {
        stopPolling();
        try { await poll("sync"); } catch (e) { console.warn(e); }
        if (!stopped) setLive("done");
        return;
      }
      // Broken, ended early (server restart) or refused: poll until the stream is back.
      if (outcome instanceof ApiError && outcome.status === 401) {
        // The token was refused: entering another one re-opens the view.
        stopPolling();
        setLive("offline");
        showTokenNeeded();
        return;
      }
      startPolling();
      failures += 1;
      await sleep(Math.min(15000, 1000 * 2 ** (failures - 1)), timers);
      if (!stopped) liveStats.reconnects += 1;
    }
  })();
  return () => { stopped = true; stopPolling(); ctl.abort(); clearTimeout(timers.t); setLive("offline"); };
}

// ---------- views ----------

let stopLive = () => {};

function jobRoute(job) {
  return `#/${job.kind === "analysis" ? "analyses" : "merges"}/${job.id}`;
}

async function listView(params) {
  const kind = params.get("kind") === "analyses" ? "analyses" : "merges";
  const filter = STATES.includes(params.get("state")) ? params.get("state") : "";
  const main = $("#main");
  const body = el("tbody", { id: "jobs" });
  const table = el("table", { id: "job-table" },
    el("thead", {}, el("tr", {},
      ["id", "state", "method", "progress", "created", "finished", ""].map((h) => el("th", { text: h })))),
    body);
  const filterLink = (state, label) => {
    const q = new URLSearchParams({ kind });
    if (state) q.set("state", state);
    return el("button", { class: state === filter ? "on" : "", "data-filter": state || "all",
      onclick: () => { location.hash = `#/?${q}`; } }, label);
  };
  const kindLink = (k, label) => el("button", { class: k === kind ? "on" : "", "data-kind": k,
    onclick: () => { location.hash = `#/?kind=${k}`; } }, label);
  const errorSlot = el("div");
  main.replaceChildren(
    el("h1", { text: "Jobs" }),
    el("div", { class: "filters" }, kindLink("merges", "Merges"), kindLink("analyses", "Analyses"),
      el("span", { class: "muted", text: " · state:" }),
      filterLink("", "all"), STATES.map((s) => filterLink(s, s))),
    errorSlot, table);

  const rows = new Map();
  // `via`: how this row's latest data came ("load", "sync", "stream" or "poll"), kept on the
  // row as data-via (tests/dashboard.rs reads it).
  const render = (job, via) => {
    const k = job.kind || (kind === "analyses" ? "analysis" : "merge");
    if ((k === "analysis") !== (kind === "analyses")) return;
    job.kind = k;
    const old = rows.get(job.id);
    if (filter && job.state !== filter) { if (old) { old.remove(); rows.delete(job.id); } return; }
    const p = job.progress || {};
    const tr = el("tr", { "data-id": job.id, "data-state": job.state, "data-via": via },
      el("td", { class: "id" }, el("a", { href: jobRoute(job), text: job.id })),
      el("td", {}, stateBadge(job.state)),
      el("td", { text: methodOf(job) }),
      el("td", {}, progressBar(p, job.state), el("div", { class: "bar-label", text: `${p.tensors_done || 0}/${p.tensors_total || 0} tensors · ${bytes(p.bytes_read)} read` })),
      el("td", { text: when(job.created_at) }),
      el("td", { text: when(job.finished_at) }),
      el("td", {}, job.state === "queued" || job.state === "running"
        ? el("button", { class: "danger", "data-action": "cancel", onclick: () => cancelJob(job) }, "Cancel") : null));
    if (old) old.replaceWith(tr);
    else {
      // Newest first: ids are UUIDv7 (time-ordered), so go before the first older row.
      const before = [...body.children].find((r) => r.dataset.id < job.id);
      body.insertBefore(tr, before || null);
    }
    rows.set(job.id, tr);
  };
  const refresh = async (via = "load") => {
    const q = new URLSearchParams({ limit: "100" });
    if (filter) q.set("state", filter);
    const page = await api(`/v1/${kind}?${q}`);
    errorSlot.replaceChildren();
    const seen = new Set();
    for (const job of page.jobs) { seen.add(job.id); render(job, via); }
    for (const [id, tr] of rows) if (!seen.has(id)) { tr.remove(); rows.delete(id); }
  };
  try { await refresh(); } catch (e) {
    errorSlot.replaceChildren(errorBox(e));
    if (e.status === 401) return; // entering a token re-opens the view
  }
  stopLive = live("/v1/events", (name, data) => { if (name === "state") render(data, "stream"); },
    async (via) => { await refresh(via); });
}

async function cancelJob(job) {
  const kind = job.kind === "analysis" ? "analyses" : "merges";
  try {
    await api(`/v1/${kind}/${job.id}/cancel`, { method: "POST" });
    flash(`cancel requested for ${job.id}`);
  } catch (e) {
    flash(`cancel failed: ${e.code || ""} ${e.message}`);
  }
}

function evaluationsSection(search) {
  if (!search || !Array.isArray(search.evaluations) || !search.evaluations.length) return null;
  const evals = search.evaluations;
  const table = el("table", { id: "evaluations" },
    el("thead", {}, el("tr", {}, ["step", "evaluation", "purpose", "ingredients", "score", "accepted"].map((h) => el("th", { text: h })))),
    el("tbody", {}, evals.map((e, i) => el("tr", {},
      el("td", { class: "num", text: i }),
      el("td", { class: "mono", text: e.evaluation_id }),
      el("td", { text: e.purpose }),
      el("td", { text: (e.ingredients || []).join(", ") }),
      el("td", { class: "num", text: Number(e.score).toFixed(4) }),
      el("td", { text: e.accepted === undefined ? "" : e.accepted ? "yes" : "no" })))));
  return el("section", {}, el("h2", { text: `Evaluations (${search.kind || "search"}; best ${search.best_score ?? "–"})` }),
    scoreChart(evals), table);
}

// A small SVG chart of score per evaluation step (no chart library).
function scoreChart(evals) {
  const W = 560, H = 160, P = 28;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("id", "score-chart");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const scores = evals.map((e) => Number(e.score));
  let lo = Math.min(...scores), hi = Math.max(...scores);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const x = (i) => P + (evals.length === 1 ? (W - 2 * P) / 2 : (i * (W - 2 * P)) / (evals.length - 1));
  const y = (s) => H - P - ((s - lo) * (H - 2 * P)) / (hi - lo);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("line", { class: "axis", x1: P, y1: H - P, x2: W - P, y2: H - P });
  add("line", { class: "axis", x1: P, y1: P, x2: P, y2: H - P });
  add("text", { x: 2, y: P + 4 }, hi.toFixed(3));
  add("text", { x: 2, y: H - P }, lo.toFixed(3));
  add("text", { x: W / 2 - 20, y: H - 6 }, "evaluation step");
  add("polyline", { class: "line", points: scores.map((s, i) => `${x(i)},${y(s)}`).join(" ") });
  evals.forEach((e, i) => {
    const c = add("circle", { cx: x(i), cy: y(scores[i]), r: 4,
      class: e.accepted === false ? "rejected" : "accepted" });
    const t = document.createElementNS(ns, "title");
    t.textContent = `${e.evaluation_id}: ${scores[i]}`;
    c.append(t);
  });
  return svg;
}

function filesSection(result) {
  if (!result || !Array.isArray(result.files)) return null;
  return el("section", {}, el("h2", { text: "Output" }),
    el("p", { class: "mono", text: result.uri || "" }),
    el("table", { id: "files" },
      el("thead", {}, el("tr", {}, ["file", "size", "sha256"].map((h) => el("th", { text: h })))),
      el("tbody", {}, result.files.map((f) => el("tr", {},
        el("td", { class: "mono", text: f.path }),
        el("td", { class: "num", text: bytes(f.size) }),
        el("td", { class: "mono", text: f.sha256 }))))));
}

async function jobView(kind, id) {
  const main = $("#main");
  main.replaceChildren(el("h1", { class: "mono", text: id }), el("p", { class: "muted", text: "loading…" }));
  // `via`: how the data on screen came ("load", "sync", "stream" or "poll"); kept as data-via
  // on the title and the progress label (tests/dashboard.rs reads them).
  let job, via = "load", progressVia = "load";
  const show = () => {
    const p = job.progress || {};
    const terminal = ["succeeded", "failed", "cancelled"].includes(job.state);
    // Absent sections are null: keep them out (replaceChildren would print "null").
    main.replaceChildren(...[
      el("h1", { "data-via": via }, el("span", { class: "mono", id: "job-id", text: job.id }), " ", stateBadge(job.state)),
      el("div", { class: "row" },
        el("button", { class: "danger", id: "cancel", disabled: terminal || undefined,
          onclick: async () => { await cancelJob({ ...job, kind: kind === "analyses" ? "analysis" : "merge" }); await reload(); } }, "Cancel"),
        kind === "merges" ? el("button", { id: "resubmit", onclick: () => resubmit(job) }, "Resubmit…") : null,
        el("a", { href: "#/", text: "← all jobs" })),
      el("div", { class: "card" },
        el("dl", { class: "facts" },
          el("dt", { text: "method" }), el("dd", { text: methodOf({ ...job, kind: kind === "analyses" ? "analysis" : "merge" }) }),
          el("dt", { text: "attempts" }), el("dd", { text: `${job.attempts} of ${job.max_attempts}` }),
          el("dt", { text: "created" }), el("dd", { text: when(job.created_at) }),
          el("dt", { text: "started" }), el("dd", { text: when(job.started_at) }),
          el("dt", { text: "finished" }), el("dd", { text: when(job.finished_at) }),
          job.idempotency_key ? [el("dt", { text: "idempotency key" }), el("dd", { class: "mono", text: job.idempotency_key })] : null,
          el("dt", { text: "progress" }), el("dd", {}, progressBar(p, job.state), el("div", { class: "bar-label", id: "progress-label", "data-via": progressVia, text: progressLabel(p) })))),
      job.error ? el("section", {}, el("h2", { text: "Error" }), errorBox(job.error)) : null,
      evaluationsSection(job.search || (job.result && job.result.search)),
      filesSection(job.result),
      kind === "analyses" && job.result ? el("section", {}, el("h2", { text: "Result" }), el("pre", { text: JSON.stringify(job.result, null, 2) })) : null,
      el("section", {}, el("h2", { text: "Recipe" }), el("pre", { id: "recipe", text: JSON.stringify(job.recipe, null, 2) })),
    ].filter(Boolean));
  };
  const reload = async (how = "load") => {
    job = await api(`/v1/${kind}/${id}`);
    via = progressVia = how;
    show();
  };
  try { await reload(); } catch (e) { main.replaceChildren(el("h1", { class: "mono", text: id }), errorBox(e)); return; }
  stopLive = live(`/v1/${kind}/${id}/events`, (name, data) => {
    if (name === "state" || name === "done") { job = data; via = progressVia = "stream"; show(); }
    else if (name === "progress") {
      const { search, ...progress } = data;
      job = { ...job, progress: { ...(job.progress || {}), ...progress }, search: search ?? job.search };
      progressVia = "stream";
      show();
    }
  }, reload, { resync: false, final: "done" });
}

// The stored recipe (normalized: `parameters` tagged with the method, slices naming models
// by index, a search beside the soup it searches within) back in the form POST /v1/merges
// takes. What cannot be carried over (a trajectory's selection: its models are kept
// explicitly) is left to the form, which shows the validation error in place.
function requestOf(stored) {
  const nonEmpty = (o) => o && Object.keys(o).length ? o : undefined;
  const { method: _tag, ...parameters } = stored.parameters || {};
  const output = { uri: stored.output && stored.output.uri };
  if (stored.output && stored.output.dtype) output.dtype = stored.output.dtype;
  if (stored.output && stored.output.max_shard_size) output.max_shard_size = stored.output.max_shard_size;
  const models = stored.models || [];
  const req = {
    method: stored.method,
    models: models.map((m) => ({ uri: m.uri, weight: m.weight, parameters: nonEmpty(m.parameters) })),
    base_model: stored.base_model || undefined,
    parameters: nonEmpty(parameters),
    output,
    input_dtype: stored.input_dtype || undefined,
  };
  if (Array.isArray(stored.slices) && stored.slices.length) {
    req.slices = stored.slices.map((sl) => ({ sources: sl.sources.map((src) => ({
      uri: models[src.model] ? models[src.model].uri : String(src.model),
      layer_range: src.layer_range, parameters: nonEmpty(src.parameters) })) }));
    delete req.models;
  }
  const search = stored.search;
  if (search && search.kind === "greedy") {
    req.method = "greedy_soup";
    delete req.parameters;
    req.models = models.map((m, i) => ({ uri: m.uri,
      score: search.scores && search.scores[i] != null ? search.scores[i] : undefined }));
    req.evaluator = search.evaluator;
    req.accept = search.accept;
  } else if (search && search.kind === "sweep") {
    req.sweep = { parameter: search.parameter, values: search.values };
    req.evaluator = search.evaluator;
    if (req.parameters) delete req.parameters[search.parameter];
  }
  return JSON.parse(JSON.stringify(req)); // drops the undefined fields
}

function resubmit(job) {
  sessionStorage.setItem("ladle.draft", JSON.stringify(requestOf(job.recipe || {}), null, 2));
  location.hash = "#/submit";
}

const EXAMPLE = `{
  "method": "linear",
  "models": [{"uri": "file:///abs/ladle-data/ft-a/"}, {"uri": "file:///abs/ladle-data/ft-b/"}],
  "output": {"uri": "file:///abs/ladle-data/soups/run-1/"}
}`;

function submitView() {
  const main = $("#main");
  const draft = sessionStorage.getItem("ladle.draft");
  sessionStorage.removeItem("ladle.draft");
  const area = el("textarea", { id: "recipe-input", spellcheck: "false" });
  area.value = draft || EXAMPLE;
  const type = el("select", { id: "content-type" },
    el("option", { value: "application/json", text: "JSON (ladle recipe)" }),
    el("option", { value: "application/yaml", text: "mergekit YAML" }));
  const result = el("div", { id: "submit-result" });
  const send = async (ev) => {
    ev.preventDefault();
    result.replaceChildren();
    try {
      const job = await api("/v1/merges", { method: "POST", headers: { "Content-Type": type.value }, body: area.value });
      flash(`submitted ${job.id}`);
      location.hash = `#/merges/${job.id}`;
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  };
  main.replaceChildren(
    el("h1", { text: "Submit a merge" }),
    el("form", { id: "submit-form", onsubmit: send },
      el("div", { class: "row" }, el("label", {}, "Format ", type),
        el("span", { class: "muted", text: "Paste a recipe as POST /v1/merges takes it (YAML: model references are storage URLs or hub ids; add output: {uri: …})." })),
      area,
      result,
      el("div", { class: "row" }, el("button", { class: "primary", type: "submit", id: "submit" }, "Submit"))));
}

// ---------- token, routing ----------

function showTokenNeeded() {
  $("#token").focus();
  flash("this server needs an API token: enter it above");
}

function tokenControls() {
  const has = Boolean(token());
  $("#token-clear").hidden = !has;
  $("#token").placeholder = has ? "token set for this tab" : "API token (kept for this tab)";
}

$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("#token").value.trim();
  if (v) sessionStorage.setItem(TOKEN_KEY, v);
  $("#token").value = "";
  tokenControls();
  route();
});
$("#token-clear").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  tokenControls();
  route();
});

function route() {
  stopLive();
  stopLive = () => {};
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("nav a").forEach((a) => a.classList.remove("active"));
  const m = path.match(/^\/(merges|analyses)\/([0-9a-fA-F-]{36})$/);
  if (m) return jobView(m[1], m[2]);
  if (path === "/submit") { $("#nav-submit").classList.add("active"); return submitView(); }
  $("#nav-jobs").classList.add("active");
  return listView(params);
}

window.addEventListener("hashchange", route);
tokenControls();
route();
