// The dashboard around the terminal: an overview on arrival (summary, device
// grid, running tasks, the newest tasks, charts of the last hour, recent
// failures), live over /stream/overview; a view with its own URL for every
// device (#/device/ID), task (#/task/ID), group (#/group/ID) and map
// (#/map/ID); the actions the admin token allows, each after a confirmation.
// Text from the cluster only ever goes into the page as text nodes
// (textContent), never as HTML.
"use strict";

(() => {   // its own scope: the page's other script (the terminal) has names of its own

const STREAM_PATH = "/stream/overview";
const OVERVIEW_PATH = "/api/v1/overview";
const POLL_MS = 5000;               // overview by polling while the stream is down
const STREAM_RETRY_MS = 30000;      // a closed stream (e.g. 503: too many) is tried again after
const TICK_MS = 1000;               // ages on the page move this often
const LOST_AFTER_S = 10;            // seconds without the stream before the dot turns red
const OBJECT_REFRESH_MS = 2000;     // an open task/device/group view reads again this often
const WATCH_MS = 20000;             // an open device view asks for live figures this often
const CHART_MINUTES = 60;           // the charts' time axis
const CHART_TICK_MINUTES = 15;      // a labelled tick on the time axis this often
const DEVICE_TASKS = 20;            // tasks listed in a device's view
const STORE_FULL = 0.9;             // the file store's tile turns red past this much of its quota
const SVG = "http://www.w3.org/2000/svg";
const TERMINAL_STATES = ["completed", "failed", "timed_out", "cancelled"];
// How a device's figures are named in its view (others: their own name).
const FIGURE_NAMES = {cpu_percent: "CPU", memory_percent: "memory", disk_percent: "disk",
                      battery_percent: "battery", temperature_c: "temperature",
                      load_avg: "load 1/5/15 min", uptime_s: "up for",
                      disk_read_bytes: "disk read", disk_write_bytes: "disk written",
                      net_bytes_recv: "net received", net_bytes_sent: "net sent"};

// What a device says of itself (hostname, labels, tags…) is shown with these
// characters as "?", as rc's tables show it (lib/rc/render.py, CONTROL; a test
// checks the two sets agree): control characters, and the invisible ones that
// reorder or hide text — the bidirectional embeddings, overrides, isolates and
// marks (a device named "\u202egood" reads "doog"), the zero-width space and
// the BOM. The joiners that Persian and emoji sequences need are left alone.
const HIDDEN_CHARACTERS = /[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]/g;

let picture = null;                 // the last overview from the main node
let skew = 0;                       // the main node's clock minus ours, in seconds
let stream = null, pollTimer = null, lastPictureAt = 0;
let objectView = null;              // {kind, id, timers}

// -- small helpers -------------------------------------------------------------------

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A device's own words as one line of plain text (render.cell).
function shown(value) {
  if (value === null || value === undefined) return value;
  return String(value).replace(/\r\n|[\n\r\t]/g, " ").replace(HIDDEN_CHARACTERS, "?");
}

function svg(tag, attributes, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function nowOnServer() { return Date.now() / 1000 + skew; }

function ageText(seconds) {
  seconds = Math.max(0, seconds);
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h";
  return Math.round(seconds / 86400) + " d";
}

// An age that moves by itself: "12 s ago".
function since(moment, suffix) {
  if (!moment) return el("span", {class: "dim", text: "never"});
  if (suffix === undefined) suffix = " ago";
  return el("span", {class: "age", "data-since": String(moment), "data-suffix": suffix,
                     text: ageText(nowOnServer() - moment) + suffix});
}

function tickAges() {
  for (const node of document.querySelectorAll("[data-since]"))
    node.textContent = ageText(nowOnServer() - parseFloat(node.dataset.since)) + node.dataset.suffix;
  showConnection();
}

function clock(moment) {
  if (!moment) return "";
  const date = new Date((moment - skew) * 1000);
  const today = date.toDateString() === new Date().toDateString();   // then the time says enough
  return today ? date.toLocaleTimeString(undefined, {hour12: false})
               : date.toLocaleString(undefined, {hour12: false});
}

function percent(value) {
  return typeof value === "number" ? Math.round(value) + "%" : "–";
}

function bar(fraction, kind, label) {
  const shown = typeof fraction === "number" ? Math.min(Math.max(fraction, 0), 1) : null;
  const fill = el("span", {class: "fill"});
  fill.style.width = shown === null ? "0" : (shown * 100).toFixed(1) + "%";
  return el("span", {class: "bar " + (kind || "") + (shown === null ? " empty" : ""),
                     role: "img", "aria-label": label || ""}, fill);
}

function taskLink(id) { return el("a", {href: "#/task/" + id, class: "id", text: String(id)}); }

function deviceLink(id) {
  if (!id) return el("span", {class: "dim", text: "–"});
  return el("a", {href: "#/device/" + encodeURIComponent(id), class: "id", text: id});
}

function groupLink(id, kind) {
  return el("a", {href: "#/" + (kind || "group") + "/" + id, class: "id", text: String(id)});
}

function stateChip(state) {
  return el("span", {class: "chip state-" + state.replace(/[^a-z_]/g, ""), text: state.replace("_", " ")});
}

function table(columns, rows, emptyText) {
  // columns: [{title, cell(row), class}] where class "opt" or "opt2" drops it on narrow screens
  if (!rows.length) return el("p", {class: "empty", text: emptyText});
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(c => el("th", {class: c.class, text: c.title})))),
    el("tbody", {}, rows.map(row => el("tr", {class: row.rowClass || null},
      columns.map(c => el("td", {class: c.class}, c.cell(row)))))));
}

function panel(title, ...children) {
  return el("section", {class: "panel"}, el("h2", {text: title}), ...children);
}

// A panel that comes last when the view is one column (a phone).
function laterPanel(title, ...children) {
  const node = panel(title, ...children);
  node.classList.add("later");
  return node;
}

async function getJSON(path) {
  const response = await fetch(path, {headers: window.rcToken.headers()});
  let body = null;
  try { body = await response.json(); } catch (e) { body = {error: response.statusText}; }
  return [response.status, body];
}

// -- the live link -----------------------------------------------------------------

let connection = "connecting", connectionSince = Date.now() / 1000;

function setConnection(state) {
  if (state !== connection) connectionSince = Date.now() / 1000;
  connection = state;
  showConnection();
}

function showConnection() {
  const node = document.getElementById("connection");
  const now = Date.now() / 1000;
  const shown = connection === "connecting" && now - connectionSince > LOST_AFTER_S ? "lost" : connection;
  const age = lastPictureAt ? " · figures " + ageText(now - lastPictureAt) + " old" : "";
  const words = {live: "live", polling: "polling", connecting: "connecting",
                 lost: "no link to the main node", token: "needs the admin token"};
  node.textContent = words[shown] + (shown === "live" ? "" : age);
  node.className = "connection " + shown;
}

async function openStream() {
  if (stream) stream.close();
  await window.rcStreamSession();
  stream = new EventSource(STREAM_PATH);
  stream.addEventListener("overview", event => { setConnection("live"); take(JSON.parse(event.data)); });
  stream.onopen = () => { setConnection("live"); stopPolling(); };
  stream.onerror = () => {
    if (stream.readyState === EventSource.CLOSED) {      // refused: poll, try again later
      if (connection === "token") return;                 // until a token is given
      startPolling();
      setTimeout(() => { if (connection !== "token") openStream(); }, STREAM_RETRY_MS);
    } else {
      setConnection("connecting");
    }
  };
}

function startPolling() {
  if (pollTimer || connection === "token") return;
  setConnection("polling");
  pollTimer = setInterval(fetchOverview, POLL_MS);
}

function stopPolling() {
  clearInterval(pollTimer);
  pollTimer = null;
}

async function fetchOverview() {
  try {
    const [status, body] = await getJSON(OVERVIEW_PATH);
    if (status === 401) {
      stopPolling();
      setConnection("token");
      return renderNeedsToken(body.error);
    }
    if (status !== 200) return setConnection(pollTimer ? "polling" : "connecting");
    take(body);
    if (connection !== "live") setConnection(pollTimer ? "polling" : "connecting");
  } catch (e) {
    setConnection("connecting");      // red once it has lasted LOST_AFTER_S
  }
}

function take(next) {
  picture = next;
  skew = next.now - Date.now() / 1000;
  lastPictureAt = Date.now() / 1000;
  window.rcTerminal.know(next.running.map(t => t.task_id).concat(next.failures.map(t => t.task_id)),
                         next.devices.map(d => d.device_id));
  if (currentRoute().kind === "overview") renderOverview();
  showConnection();
}

// -- the overview --------------------------------------------------------------------

// The first screen of a browser on another machine (read_access=local, the
// default): the API's own words (`send Authorization: Bearer TOKEN`) are for
// programs; a person is told where the token is, and how to open the page.
function renderNeedsToken(error) {
  const view = document.getElementById("view-overview");
  view.replaceChildren(panel("This main node needs the admin token to be read",
    el("p", {text: "The dashboard shows the cluster here once it has the admin token:"
                   + " `bin/rc token --admin` on the main node prints it. (Without it, reading"
                   + " is open to the main node itself; \"read_access\": \"open\" in its"
                   + " etc/rc.json opens it to everyone on the network.)"}),
    el("button", {type: "button", class: "primary", text: "Give the admin token",
                  onclick: () => askToken()}),
    el("p", {class: "dim", text: error || ""})));
}

function renderOverview() {
  const view = document.getElementById("view-overview");
  if (!picture) { view.replaceChildren(el("p", {class: "empty", text: "Waiting for the main node…"})); return; }
  redrawView(view, [
    summaryTiles(picture),
    el("div", {class: "overview-columns"},
      el("div", {class: "column"},
        panel("Devices", deviceGrid(picture.devices),
              picture.devices.length < picture.summary.devices_total
                ? el("p", {class: "dim", text: (picture.summary.devices_total - picture.devices.length)
                                               + " more: `devices` in the terminal lists them all"})
                : null),
        panel("Running tasks", runningTable(picture.running)),
        // What failed belongs on the first screen (below the charts it was out of sight).
        panel("Recent failures", failureTable(picture.failures))),
      el("div", {class: "column"},
        (picture.groups || []).length ? panel("Maps and groups", groupTable(picture.groups)) : null,
        panel("Newest tasks", recentTable(picture.recent || [])),
        panel("Last hour", charts(picture.history))))]);
}

function summaryTiles(p) {
  const s = p.summary, h = p.history_summary || {};
  // The history holds minutes that have ended; the failures of the present
  // minute, listed below, count too (the tile said 0 over a failure just listed).
  const recorded = (p.history || []).slice(-15);
  const recordedUntil = recorded.length ? recorded[recorded.length - 1].minute + 60 : p.now - 900;
  const recentFailures = recorded.reduce((n, r) => n + (r.failed || 0), 0)
    + (p.failures || []).filter(t => t.finished_at >= recordedUntil).length;
  const tile = (label, value, extra, trouble) =>
    el("div", {class: "tile" + (trouble ? " trouble" : "")},
       el("div", {class: "tile-value", text: value}), el("div", {class: "tile-label", text: label}),
       extra || null);
  return el("div", {class: "tiles"},
    tile("devices online", s.devices_online + " / " + s.devices_total, null,
         s.devices_total > 0 && s.devices_online === 0),
    tile("slots busy", s.slots_busy + " / " + s.slots_total,
         bar(s.slots_total ? s.slots_busy / s.slots_total : 0, "slots", "slots busy")),
    tile("running", String(s.tasks_running + s.tasks_assigned)),
    tile("queued", String(s.queue_length)),
    tile("done / min (5 min)", String(s.throughput_5m)),
    tile("success (15 min)", h.success_rate === null || h.success_rate === undefined
         ? "–" : percentText(h.success_rate * 100)),
    tile("failed (15 min)", String(recentFailures), null, recentFailures > 0),
    p.files ? storeTile(p.files) : null);
}

// The file store's room: an upload, a map's --files or a task's outputs past
// the quota are refused ("does not fit"); nearly full is said before then.
function storeTile(f) {
  const used = f.quota_bytes ? f.used_bytes / f.quota_bytes : 0;
  return el("div", {class: "tile" + (used >= STORE_FULL ? " trouble" : "")},
    el("div", {class: "tile-value", text: sizeText(f.used_bytes)}),
    el("div", {class: "tile-label", text: "files of " + sizeText(f.quota_bytes)}),
    bar(used, "store", "file store used"));
}

function deviceState(d) {
  if (d.revoked) return "revoked";
  if (d.status !== "online") return "offline";
  if (d.suspect) return "suspect";
  if (d.drained) return "drained";
  if (d.available === false) return "paused";
  return "online";
}

function availabilityText(d) {
  if (d.revoked) return "revoked: cannot connect";
  if (d.drained) return "drained: no new tasks";
  if (d.available === false) return "paused: " + (shown(d.unavailable_reason) || "unavailable");
  if (d.status !== "online") return "offline";
  return "takes tasks";
}

function figuresMoment(d) { return d.figures_at || d.last_seen; }

function deviceGrid(list) {
  if (!list.length) return el("p", {class: "empty", text: "No device has joined yet (`rc join` says how)."});
  return el("div", {class: "device-grid"}, list.map(deviceCard));
}

function deviceCard(d) {
  const state = deviceState(d);
  const stale = state === "offline" || state === "revoked" || !d.connected;
  const figure = (label, value, barNode) =>
    el("div", {class: "figure"}, el("span", {class: "figure-label", text: label}), barNode || null,
       el("span", {class: "figure-value", text: value}));
  const battery = typeof d.battery_percent === "number"
    ? Math.round(d.battery_percent) + "%" + (d.charging ? " ⚡" : "") : "–";
  return el("article", {class: "card device state-" + state + (stale ? " stale" : ""),
                        "data-device": d.device_id},
    el("header", {}, deviceLink(d.device_id), stateChip(state)),
    figure("slots", d.active_tasks + "/" + d.slots,
           bar(Math.min(d.active_tasks, d.slots) / d.slots, "slots", "slots busy")),
    figure("CPU", percent(d.cpu_percent), bar(d.cpu_percent / 100, "cpu", "CPU")),
    figure("memory", percent(d.memory_percent), bar(d.memory_percent / 100, "memory", "memory")),
    el("div", {class: "figure-row"},
       el("span", {}, "battery ", el("b", {text: battery})),
       el("span", {}, "temp ", el("b", {text: typeof d.temperature_c === "number"
                                           ? Math.round(d.temperature_c) + " °C" : "–"}))),
    el("footer", {},
       el("span", {class: "availability", text: availabilityText(d)}),
       el("span", {class: stale ? "stale-age" : "dim"}, stale ? "stale · " : "",
          since(figuresMoment(d)))));
}

function progressCell(task) {
  if (typeof task.progress !== "number")
    return el("span", {class: "dim", text: task.state === "assigned" ? "starting" : "–"});
  return el("span", {class: "progress"}, bar(task.progress / 100, "progress", "progress"),
            el("span", {class: "progress-value", text: Math.round(task.progress) + "%"}));
}

function runningTable(list) {
  return table([
    {title: "task", cell: t => taskLink(t.task_id)},
    {title: "type", class: "opt", cell: t => t.task_type},
    {title: "device", class: "opt2", cell: t => deviceLink(t.device_id)},
    {title: "progress", cell: progressCell},
    {title: "message", class: "message", cell: t => t.progress_message || t.summary || ""},
    {title: "for", class: "opt", cell: t => since(t.started_at || t.created_at, "")},
  ], list, "Nothing is running.");
}

function recentTable(list) {
  return table([
    {title: "task", cell: t => taskLink(t.task_id)},
    {title: "type", class: "opt", cell: t => t.task_type},
    {title: "state", cell: t => stateChip(t.state)},
    {title: "what", class: "message", cell: t => t.summary || ""},
    {title: "when", class: "opt2", cell: t => since(t.finished_at || t.created_at)},
  ], list, "No task yet: `submit` in the terminal queues one.");
}

// A map's progress: its tasks that ended among all, and how they ended.
function groupTable(list) {
  const ended = g => TERMINAL_STATES.reduce((n, state) => n + (g.states[state] || 0), 0);
  return table([
    {title: "map", cell: g => [g.kind === "map" ? "" : "group ", groupLink(g.group_id, g.kind)]},
    // A map counts its inputs (`rc map`'s 2 of 36 did not complete), a group its tasks.
    {title: "done", cell: g => el("span", {class: "progress"},
      bar(g.tasks ? ended(g) / g.tasks : 0, "progress", "tasks ended"),
      el("span", {class: "progress-value", text: ended(g) + "/" + g.tasks}))},
    {title: "tasks", cell: g => Object.entries(g.states).sort((a, b) => b[1] - a[1]).map(([state, n], i) =>
      [i ? ", " : "", el("span", {class: /failed|timed_out/.test(state) ? "error-text" : null,
                                  text: n + " " + state.replace("_", " ")})])},
    {title: "runs", class: "message", cell: g => g.summary || g.task_type},
  ], list, "");
}

function failureTable(list) {
  return table([
    {title: "task", cell: t => taskLink(t.task_id)},
    {title: "type", class: "opt", cell: t => t.task_type},
    {title: "state", class: "opt2", cell: t => stateChip(t.state)},
    {title: "device", class: "opt", cell: t => deviceLink(t.device_id)},
    {title: "when", class: "opt2", cell: t => since(t.finished_at)},
    // What it ran tells which of a map's 36 look-alike tasks it was (`exit status 2` did not).
    {title: "error", class: "message", cell: t => [t.error || t.reason || "",
      t.summary ? el("span", {class: "dim", text: " · " + t.summary}) : null]},
  ], list, "No failures lately.");
}

// -- charts: plain SVG with a time axis -------------------------------------------------

function charts(history) {
  // As the success tile (stats.summary): cancelled is neither success nor failure.
  const rate = r => {
    const judged = r.completed + r.failed;
    return judged ? 100 * r.completed / judged : null;
  };
  // The gauges end at the present (the summary's figures), so a chart's
  // last value agrees with the tiles above it.
  const s = picture.summary;
  return el("div", {class: "charts"},
    chart("done per minute", history, r => r.completed, "", null, s.throughput_1m),
    chart("queue length", history, r => r.queue_length, "", null, s.queue_length),
    chart("devices online", history, r => r.devices_online, "", null, s.devices_online),
    chart("success rate", history, rate, "%", 100, null, percentText));
}

// 99.9 % shown as 100 % beside a failure reads as none failed: below 100,
// never rounded up to it.
function percentText(value) {
  return (value < 100 && Math.round(value) === 100 ? Math.floor(value * 10) / 10
          : Math.round(value)) + "%";
}

function chart(title, history, value, unit, fixedTop, present, format) {
  const width = 320, height = 120, left = 34, right = 8, top = 8, bottom = 20;
  const end = picture.now, start = end - CHART_MINUTES * 60;
  // A minute's row is drawn at its middle; the present, at the right edge.
  const points = history.filter(r => r.minute >= start).map(r => [r.minute + 30, value(r)]);
  if (typeof present === "number") points.push([end, present]);
  const known = points.filter(p => typeof p[1] === "number");
  const highest = fixedTop || Math.max(1, ...known.map(p => p[1]));
  const x = t => left + (t - start) / (end - start) * (width - left - right);
  const y = v => top + (1 - v / highest) * (height - top - bottom);
  const box = svg("svg", {viewBox: "0 0 " + width + " " + height, class: "chart-svg",
                          role: "img", "aria-label": title + " over the last hour"});
  box.append(svg("line", {x1: left, y1: y(0), x2: width - right, y2: y(0), class: "axis"}),
             svg("line", {x1: left, y1: y(highest), x2: width - right, y2: y(highest), class: "grid"}),
             svg("text", {x: left - 4, y: y(highest) + 4, class: "label end"}, round(highest) + unit),
             svg("text", {x: left - 4, y: y(0) + 4, class: "label end"}, "0"));
  for (let t = Math.ceil(start / (CHART_TICK_MINUTES * 60)) * CHART_TICK_MINUTES * 60; t <= end;
       t += CHART_TICK_MINUTES * 60) {
    box.append(svg("line", {x1: x(t), y1: y(0), x2: x(t), y2: y(0) + 4, class: "axis"}),
               svg("text", {x: x(t), y: height - 4, class: "label middle"}, hourMinute(t)));
  }
  let path = "", pen = false;
  for (const [t, v] of points) {
    if (typeof v !== "number") { pen = false; continue; }
    path += (pen ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1);
    pen = true;
  }
  if (path) box.append(svg("path", {d: path, class: "line"}));
  if (known.length) {       // the latest value, also where a gap leaves it alone
    const [t, v] = known[known.length - 1];
    box.append(svg("circle", {cx: x(t), cy: y(v), r: 3, class: "dot"}));
  }
  const text = format || (v => round(v) + unit);
  const last = known.length ? text(known[known.length - 1][1]) : "–";
  return el("figure", {class: "chart"},
    el("figcaption", {}, el("span", {text: title}), el("b", {text: last})),
    known.length ? box : el("p", {class: "empty chart-empty", text: "no figures yet this hour"}));
}

function round(value) { return Math.abs(value) >= 10 ? Math.round(value) : Math.round(value * 10) / 10; }

function hourMinute(moment) {
  return new Date((moment - skew) * 1000).toLocaleTimeString(undefined,
    {hour: "2-digit", minute: "2-digit", hour12: false});
}

// -- routes ----------------------------------------------------------------------------

function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const kind = parts[0] || "overview";
  const id = parts.slice(1).join("/");
  if (["task", "group", "map"].includes(kind) && /^\d+$/.test(id)) return {kind, id};
  if (kind === "device" && id) {
    try { return {kind, id: decodeURIComponent(id)}; } catch (e) { return {kind: "overview"}; }
  }
  if (kind === "terminal") return {kind};
  return {kind: "overview"};
}

function route() {
  const where = currentRoute();
  closeObjectView();
  for (const name of ["overview", "object", "terminal"])
    document.getElementById("view-" + name).hidden =
      name !== (["overview", "terminal"].includes(where.kind) ? where.kind : "object");
  for (const link of document.querySelectorAll("[data-nav]"))
    link.classList.toggle("current", link.dataset.nav === where.kind);
  document.body.dataset.view = where.kind;
  if (where.kind === "terminal") return window.rcTerminal.show();
  currentView().focus({preventScroll: true});    // so PageDown and arrows scroll it
  if (where.kind === "overview") return renderOverview();
  openObjectView(where);
}

function currentView() {
  return document.getElementById(currentRoute().kind === "overview" ? "view-overview" : "view-object");
}

function closeObjectView() {
  if (!objectView) return;
  for (const timer of objectView.timers) clearInterval(timer);
  objectView = null;
}

function openObjectView(where) {
  const view = document.getElementById("view-object");
  view.replaceChildren(el("p", {class: "empty", text: "Loading…"}));
  // What it showed before is gone: a map opened again from the overview (or
  // as #/group/ID) read the same answer, and update() kept "Loading…" for good.
  delete view.dataset.shown;
  view.scrollTop = 0;
  const state = {kind: where.kind, id: where.id, timers: []};
  objectView = state;
  const draw = {task: drawTask, device: drawDevice, group: drawGroup, map: drawGroup}[where.kind];
  // One read at a time: on a slow link, reads started every OBJECT_REFRESH_MS
  // piled up behind each other (and an old answer could replace a newer one).
  const again = async () => {
    if (objectView !== state || state.drawing) return;
    state.drawing = true;
    try { await draw(state, view); state.drawn = true; }
    catch (e) {
      // The connection dot says when the main node is out of reach; a view
      // never drawn said only "Loading…" under it, for as long as it lasted.
      if (!state.drawn && objectView === state)
        view.replaceChildren(el("p", {class: "empty", text: "Loading… the main node does not"
          + " answer (restarting, or stopped?); trying again every few seconds."}));
    }
    finally { state.drawing = false; }
  };
  state.again = again;
  again();
  state.timers.push(setInterval(again, OBJECT_REFRESH_MS));
  if (where.kind === "device") {
    watchDevice(state);
    state.timers.push(setInterval(() => watchDevice(state), WATCH_MS));
  }
}

function objectHeader(title, chip, actions) {
  return el("header", {class: "object-header"},
    el("a", {href: "#/", class: "back", text: "← overview"}),
    el("h1", {}, title, chip || null),
    el("div", {class: "actions"}, actions || []));
}

function keyValues(pairs) {
  return el("dl", {class: "key-values"}, pairs.filter(p => p[1] !== null && p[1] !== undefined && p[1] !== "")
    .map(([key, value]) => [el("dt", {text: key}), el("dd", {}, value)]));
}

function pre(text, trouble) {
  return el("pre", {class: "output" + (trouble ? " trouble" : ""), text: text});
}

function json(value) { return JSON.stringify(value, null, 2); }

// Replace the view's contents only when what it shows changed, so a
// selection or a scrolled <pre> survives the refresh.
function update(view, state, key, build) {
  if (objectView !== state) return;
  if (view.dataset.shown === key) return;
  view.dataset.shown = key;
  redrawView(view, build());
}

// Draw a live view anew and keep the reader's place: its scroll, and the
// keyboard's focus (a live overview redrawn every second or so had sent it
// back to the top of the page after each Tab).
function redrawView(view, children) {
  const scroll = view.scrollTop, focused = focusedIn(view);
  view.replaceChildren(...children);
  view.scrollTop = scroll;
  if (focused) refocus(view, focused);
}

// The focused link or button in the view, to be found again by its
// address and words (and which of its twins it was).
function focusedIn(view) {
  const node = document.activeElement;
  if (!node || node === view || !view.contains(node)) return null;
  return {node, index: twins(view, node).indexOf(node)};
}

function twins(view, node) {
  return [...view.querySelectorAll(node.tagName)].filter(other =>
    other.getAttribute("href") === node.getAttribute("href") && other.textContent === node.textContent);
}

function refocus(view, {node, index}) {
  (twins(view, node)[index] || view).focus({preventScroll: true});
}

function notFound(view, state, what, error) {
  update(view, state, "missing " + error, () => [objectHeader(what),
    el("p", {class: "empty", text: error || "not found"})]);
}

// -- a task ---------------------------------------------------------------------------------

async function drawTask(state, view) {
  const id = state.id;
  const [status, task] = await getJSON("/api/v1/tasks/" + id);
  if (status !== 200) return notFound(view, state, "Task " + id, task.error);
  const terminal = TERMINAL_STATES.includes(task.state);
  if (terminal && state.loaded) return;       // it never changes again
  // Two reads in flight at most: a slow link's answers must not pile up.
  if (!terminal && Date.now() - (state.watchedAt || 0) >= WATCH_MS) await watchTask(state);
  const [[, why], [filesStatus, files]] = await Promise.all([
    getJSON("/api/v1/tasks/" + id + "/why"), getJSON("/api/v1/tasks/" + id + "/files")]);
  const [liveStatus, live] = terminal ? [0, null] : await getJSON("/api/v1/tasks/" + id + "/output");
  state.loaded = terminal;
  const key = JSON.stringify([task, why, files, live]);
  update(view, state, key, () => taskParts(task, why, filesStatus === 200 ? files : null,
                                           liveStatus === 200 && live.live ? live : null));
  followLiveOutput(view, state);
}

function followLiveOutput(view, state) {
  // The newest lines in sight, as `rc tail -f` shows them, until the reader
  // scrolls up in a box (then it stays where they put it).
  state.pinned = state.pinned || {};
  view.querySelectorAll("pre.live").forEach((box, i) => {
    if (state.pinned[i] !== false) box.scrollTop = box.scrollHeight;
    box.onscroll = () => {
      state.pinned[i] = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    };
  });
}

async function watchTask(state) {
  // While a task runs, its device sends its output as it comes (rc tail):
  // asked again every WATCH_MS while the view is open; fine to fail.
  state.watchedAt = Date.now();
  try {
    await (await fetch("/api/v1/tasks/" + state.id + "/watch",
                       {method: "POST", headers: window.rcToken.headers(), body: ""})).text();
  } catch (e) { /* the output panel says "not yet" */ }
}

function liveOutput(live) {
  // What the device sent so far; more came than is kept when *_end passes its length.
  const shown = (stream, trouble) => {
    const box = pre((live[stream + "_end"] > new Blob([live[stream]]).size ? "… " : "") +
                    live[stream], trouble);
    box.classList.add("live");
    return box;
  };
  return [
    live.stdout ? shown("stdout")
                : el("p", {class: "empty", text: live.updated_at ? "no output yet" : "not yet"}),
    live.stderr ? [el("h3", {text: "stderr"}), shown("stderr", true)] : null,
    el("p", {class: "dim", text: "so far, as it runs (every second or so)"})];
}

function taskParts(task, why, files, live) {
  const id = task.task_id, terminal = TERMINAL_STATES.includes(task.state);
  const actions = [];
  if (!terminal) actions.push(el("button", {type: "button", class: "danger", text: "Cancel",
                                            onclick: () => cancelTask(id)}));
  if (terminal) actions.push(el("button", {type: "button", text: "Retry",
                                           title: "submit a copy of this task as a new task",
                                           onclick: () => retryTask(task)}));
  const result = task.result || {};
  const duration = task.started_at && task.finished_at ? ageText(task.finished_at - task.started_at) : null;
  return [
    objectHeader("Task " + id + " · " + task.task_type, stateChip(task.state), actions),
    el("div", {class: "object-columns"},
      el("div", {class: "column"},
        panel("Details", keyValues([
          ["state", task.state + (task.reason && task.reason !== task.state
                                   ? " (" + task.reason + ")" : "")],
          ["device", task.device_id ? deviceLink(task.device_id) : null],
          ["group", task.group_id ? groupLink(task.group_id) : null],
          ["progress", typeof task.progress === "number" ? progressCell(task) : null],
          ["message", task.progress_message],
          ["priority", task.priority], ["attempt", String(task.attempt)],
          ["retries used", task.retries_used + " of " + task.max_retries],
          ["created", clock(task.created_at)], ["started", clock(task.started_at)],
          ["finished", clock(task.finished_at)], ["ran for", duration],
          ["depends on", task.depends_on && task.depends_on.length
            ? task.depends_on.map((d, i) => [i ? ", " : "", taskLink(d)]) : null],
          ["requirements", Object.keys(task.requirements || {}).length ? json(task.requirements) : null],
        ])),
        panel("Why", el("p", {text: (why && why.why) || ""})),
        laterPanel("Payload", pre(json(task.payload)))),
      el("div", {class: "column"},
        live ? panel("Output", liveOutput(live)) : panel("Output",
          result.output ? pre(result.output) : el("p", {class: "empty", text: terminal ? "no output" : "not yet"}),
          restOf(id, result.output, files, ".rc/stdout"),
          result.stderr ? [el("h3", {text: "stderr"}), pre(result.stderr, true)] : null,
          restOf(id, result.stderr, files, ".rc/stderr"),
          task.error ? [el("h3", {text: "error"}), pre(task.error, true)] : null,
          result.return_value !== undefined ? [el("h3", {text: "value"}), pre(json(result.return_value))] : null),
        panel("Files", filesTable(id, files)),
        panel("Events", table([
          {title: "time", cell: e => clock(e.time)},
          {title: "state", cell: e => stateChip(e.state)},
          {title: "try", class: "opt", cell: e => String(e.attempt)},
          {title: "device", class: "opt2", cell: e => deviceLink(e.device_id)},
          {title: "reason", class: "message", cell: e => e.reason || ""},
        ], task.events || [], "no events"))))];
}

// A stream past the inline cap: the page shows its beginning, cut mid-line;
// the whole is the stored copy (`rc get` writes it), one tap away.
function restOf(id, text, files, name) {
  const entry = ((files && files.files) || []).find(f => f.name === name);
  if (!entry || typeof entry.size !== "number") return null;
  return el("p", {class: "stream-rest dim"},
    "the first " + sizeText(new Blob([text || ""]).size) + " of " + sizeText(entry.size) +
    " above; all of it: ", fileLink(id, entry));
}

function fileLink(id, f) {
  return el("a", {href: "/api/v1/tasks/" + id + "/files/" + f.name.split("/").map(encodeURIComponent).join("/"),
                  download: f.name.split("/").pop(), text: f.name, onclick: downloadWithToken});
}

function filesTable(id, files) {
  if (!files) return el("p", {class: "empty", text: "files cannot be listed"});
  return table([
    {title: "name", cell: f => fileLink(id, f)},
    // Kept on a phone: which are the inputs and which the task left (a failed one's too).
    {title: "kind", cell: f => f.kind || ""},
    {title: "size", cell: f => typeof f.size === "number" ? sizeText(f.size) : ""},
  ], files.files || [], "no files");
}

// A link cannot send the admin token, and a browser that needs it to read
// (another machine, read_access) got a 401 instead of the file. With a token
// kept, the page first asks for the HttpOnly cookie that opens a task's files
// as it opens /stream (rcStreamSession), asks whether the file answers, then
// lets the browser save it from its link: to disk as it comes, never whole in
// the page's memory (a phone's tab could not hold a file of gigabytes).
async function downloadWithToken(event) {
  if (!window.rcToken.get()) return;          // reading is open: the link saves it
  event.preventDefault();
  const link = event.currentTarget, note = link.parentNode.querySelector(".download-note") ||
    link.parentNode.appendChild(el("span", {class: "download-note dim", role: "status"}));
  note.textContent = " downloading…";
  try {
    await window.rcStreamSession();
    const answer = await fetch(link.href, {method: "HEAD"});
    if (!answer.ok) {
      let body = {};
      try { body = await (await fetch(link.href)).json(); } catch (e) { /* the status says enough */ }
      note.className = "download-note trouble";
      note.textContent = " " + (body.error || "HTTP " + answer.status);
      return;
    }
    el("a", {href: link.href, download: link.getAttribute("download")}).click();
    note.remove();
  } catch (e) {
    note.className = "download-note trouble";
    note.textContent = " cannot reach the main node: " + e;
  }
}

function sizeText(bytes) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return (i ? bytes.toFixed(1) : bytes) + " " + units[i];
}

// -- a device -------------------------------------------------------------------------------

async function watchDevice(state) {
  // Asks the device to report every few seconds while this view is open;
  // a main node without the route (404) or a reader without the token is fine.
  try {
    const response = await fetch("/api/v1/devices/" + encodeURIComponent(state.id) + "/watch",
                                 {method: "POST", headers: window.rcToken.headers(), body: "{}"});
    state.watching = response.ok;
  } catch (e) { state.watching = false; /* the figures' age says how live they are */ }
}

async function drawDevice(state, view) {
  const path = "/api/v1/devices/" + encodeURIComponent(state.id);
  const [status, device] = await getJSON(path);
  if (status !== 200) return notFound(view, state, "Device " + state.id, device.error);
  const [[, listed], [logsStatus, logs]] = await Promise.all([
    getJSON("/api/v1/tasks?limit=" + DEVICE_TASKS + "&device=" + encodeURIComponent(state.id)),
    getJSON(path + "/logs")]);
  const key = JSON.stringify([device, listed, logsStatus, logs, state.watching]);
  update(view, state, key, () => deviceParts(device, (listed && listed.tasks) || [],
                                             logsStatus === 200 ? logs.logs || [] : null,
                                             state.watching));
}

function deviceParts(d, recent, logs, watching) {
  const metrics = d.metrics && d.metrics.system_metrics ? d.metrics.system_metrics : (d.metrics || {});
  const summary = Object.assign({}, d, {
    cpu_percent: metrics.cpu_percent, memory_percent: metrics.memory_percent,
    battery_percent: metrics.battery && typeof metrics.battery === "object"
      ? metrics.battery.percent : (metrics.battery_percent !== undefined ? metrics.battery_percent : metrics.battery),
    suspect: Boolean(d.suspect_since)});
  const state = deviceState(summary);
  const stale = state === "offline" || state === "revoked" || !d.connected;
  const id = d.device_id;
  const actions = [
    // A revoked device never connects again: draining or resuming it does nothing.
    d.revoked ? null
      : d.drained ? el("button", {type: "button", text: "Resume", onclick: () => resumeDevice(id)})
      : el("button", {type: "button", text: "Drain", onclick: () => drainDevice(id)}),
    el("button", {type: "button", text: "Label", onclick: () => labelDevice(id, d.labels)})];
  const specs = (d.profile && d.profile.hardware_specs) || {};
  return [
    objectHeader("Device " + id, stateChip(state), actions),
    // Its logs' messages are the widest text: on a laptop their column gets more room.
    el("div", {class: "object-columns device-columns"},
      el("div", {class: "column"},
        panel("Figures",
          el("p", {class: stale ? "stale-age" : "dim"},
             stale ? "stale: last heard " : "reported ", since(figuresMoment(d)),
             stale || !watching ? "" : " (every few seconds while this page is open)"),
          el("div", {class: "figures" + (stale ? " stale" : "")},
            Object.entries(metrics).filter(([, v]) => v !== null && typeof v !== "object" || Array.isArray(v))
              .map(([name, value]) => el("div", {class: "figure"},
                el("span", {class: "figure-label", text: FIGURE_NAMES[name] || name.replace(/_/g, " ")}),
                /_percent$/.test(name) && typeof value === "number" ? bar(value / 100, name, name)
                                                                     : el("span"),
                el("span", {class: "figure-value", text: figureText(name, value)}))))),
        panel("Details", keyValues([
          ["availability", availabilityText(summary)],
          ["hostname", shown(d.hostname)], ["platform", shown(d.platform)],
          ["architecture", shown(d.architecture)],
          ["role", shown(d.role)], ["CPU cores", d.cpu_cores !== null ? String(d.cpu_cores) : null],
          ["memory", d.memory_gb !== null ? d.memory_gb + " GB" : null],
          ["slots", (d.active_tasks || 0) + " busy of " + d.slots],
          ["labels", shown(Object.entries(d.labels || {}).map(([k, v]) => k + "=" + v).join(", "))],
          ["tags", shown((d.tags || []).join(", "))],
          ["task types", shown((d.task_types || []).join(", "))],
          ["capabilities", shown((d.capabilities || []).join(", "))],
          ["CPU speed", specs.cpu_speed !== undefined
            ? shown(specs.cpu_speed) + " million loop turns/s, one core" : null],
          ["address", shown(d.address)], ["joined", clock(d.registered_at)],
          ["connected since", d.connected ? clock(d.connected_at) : null],
          ["last heard", clock(d.last_seen)],
        ]))),
      el("div", {class: "column"},
        panel("Tasks", table([
          {title: "task", cell: t => taskLink(t.task_id)},
          {title: "type", class: "opt", cell: t => t.task_type},
          {title: "state", cell: t => stateChip(t.state)},
          {title: "created", class: "opt2", cell: t => since(t.created_at)},
        ], recent, "no tasks on this device")),
        panel("Logs", logs === null ? el("p", {class: "empty", text: "no logs yet"}) : table([
          // On a phone a line keeps its time, with its task under it (the message does
          // not name the task: which one failed?); its level shows as the event's colour.
          {title: "time", cell: l => [clock(l.ts), l.task_id ?
            el("span", {class: "narrow-only"}, el("br"),
               el("a", {href: "#/task/" + l.task_id, class: "id", text: "task " + l.task_id})) : null]},
          {title: "level", class: "opt2", cell: l => el("span", {class: levelClass(l), text: l.level})},
          {title: "event", cell: l => el("span", {class: levelClass(l), text: l.event})},
          {title: "task", class: "opt", cell: l => l.task_id ? taskLink(l.task_id) : ""},
          {title: "message", class: "message", cell: l => l.message || ""},
        ], logs.slice(-200).reverse(), "no logs yet"))))];
}

function levelClass(line) { return "level-" + String(line.level).replace(/[^a-z]/g, ""); }

function figureText(name, value) {
  if (typeof value === "number") {
    if (/_percent$/.test(name)) return Math.round(value) + "%";
    if (/_bytes/.test(name)) return sizeText(value);
    if (name === "temperature_c") return value.toFixed(1) + " °C";
    if (name === "uptime_s") return ageText(value);
    return String(round(value));
  }
  if (Array.isArray(value)) return value.map(v => typeof v === "number" ? v.toFixed(2) : v).join(" ");
  return String(value);
}

// -- a group (a map is a group too) ------------------------------------------------------------

// A map of 100,000 inputs was 10 MB a read, every 2 s, and 45 s before a
// phone showed a row: the view shows this many, those not completed first.
const GROUP_VIEW_TASKS = 500;

async function drawGroup(state, view) {
  const [status, group] = await getJSON("/api/v1/groups/" + state.id + "?limit=" + GROUP_VIEW_TASKS);
  if (status !== 200) return notFound(view, state, (state.kind === "map" ? "Map " : "Group ") + state.id,
                                      group.error);
  // A task's view links its group as #/group/ID: a map is told by its tasks' inputs.
  const isMap = state.kind === "map" || group.tasks.some(t => typeof t.input === "string");
  const what = (isMap ? "Map " : "Group ") + state.id;
  // What the tasks run, first: the payload comes after them all, 500 rows
  // down on a phone, and maps of one day are told apart by their command.
  const runs = ["command", "code", "expression", "message"].map(k => (group.payload || {})[k])
    .find(v => typeof v === "string");
  const left = Object.entries(group.summary).filter(([k]) => k !== "tasks" && !TERMINAL_STATES.includes(k))
    .reduce((n, [, v]) => n + v, 0);
  // By input, as rc map counts: after a resume the group holds the old tasks too.
  const counted = group.inputs || group.summary;
  const notCompleted = Object.entries(counted).filter(([k]) => k !== "tasks" && k !== "completed")
    .reduce((n, [, v]) => n + v, 0);
  const actions = left ? [el("button", {type: "button", class: "danger", text: "Cancel the rest",
                                        onclick: () => cancelGroup(state.id, what, left)})] : [];
  update(view, state, JSON.stringify(group), () => [
    objectHeader(what + " · " + group.task_type, null, actions),
    panel("Summary", keyValues([["runs", runs ? el("code", {text: runs.slice(0, 300)}) : null]]
      .concat(group.inputs ? [["inputs", Object.entries(group.inputs).map(([k, v]) => v + " " + k)
                                                                     .join(", ")]] : [])
      .concat(Object.entries(group.summary).map(([k, v]) => [k, String(v)]))),
      // What the CLI prints at the end of a map, for the one who reads it on a phone.
      isMap && !left && notCompleted ? el("p", {class: "dim", text: "`rc map --resume " + state.id +
        "` on the main node runs the " + notCompleted + (notCompleted === 1 ? " input" : " inputs") +
        " that did not complete again."}) : null),
    group.more ? el("p", {class: "dim group-more", text: group.tasks.length + " of " +
      group.summary.tasks + " tasks shown, those that did not complete first; `rc group " +
      state.id + "` lists them all"}) : null,
    panel("Tasks", table([
      {title: "task", cell: t => taskLink(t.task_id)},
      // A map's input says which task is which (12 files, 12 rows of `completed`).
      isMap ? {title: "input", class: "message", cell: t => t.input || ""} : null,
      {title: "device", class: "opt2", cell: t => deviceLink(t.device_id)},
      {title: "state", cell: t => stateChip(t.state)},
      {title: "output", class: "message", cell: t => (t.output || "").slice(0, 300)},
      // Kept on a phone: a failed task's row said only its input (its output is empty).
      // (a cancelled task's error, `cancelled`, says again what its state says, in red)
      {title: "error", class: "message", cell: t => t.error && t.state !== "cancelled"
        ? el("span", {class: "error-text", text: t.error.slice(0, 300)}) : ""},
    ].filter(Boolean), group.tasks, "no tasks")),
    panel("Payload", pre(json(group.payload)))].filter(Boolean));
}

// -- actions: a confirmation, and the admin token when there is none ------------------------

const modal = {resolve: null, run: null, opener: null};

// The token is tried on the overview before the dialog closes: a wrong one
// is said so, and the field stays for the next try.
function askToken() {
  return confirmAction({title: "Admin token", text: "`rc token --admin` on the main node prints it.",
                        fields: [], token: true, run: async () => {
                          const [status, body] = await getJSON(OVERVIEW_PATH);
                          return {ok: status === 200, status: status, error: body.error};
                        }}).then(done => done && Boolean(window.rcToken.get()));
}

// Shows the dialog; resolves true when `run(values)` succeeded, false when left.
// `token`: ask for the admin token even when one is kept (it may be wrong).
function confirmAction({title, text, fields, run, token}) {
  const form = document.getElementById("modal-form");
  document.getElementById("modal-title").textContent = title;
  document.getElementById("modal-text").textContent = text;
  const holder = document.getElementById("modal-fields");
  holder.replaceChildren(...fields.map(field => el("label", {},
    el("span", {text: field.label}),
    el("input", {name: field.name, type: field.type || "text", placeholder: field.placeholder || null,
                 value: field.value || null, checked: field.checked || null, autocomplete: "off"}))));
  tokenField(holder, token || !window.rcToken.get());
  showError(null);
  modal.opener = currentRoute().kind === "terminal" ? null : focusedIn(currentView());
  document.getElementById("modal").hidden = false;
  (holder.querySelector("input") || document.getElementById("modal-confirm")).focus();
  modal.run = run;
  return new Promise(resolve => { modal.resolve = resolve; });
}

function tokenField(holder, wanted) {
  const present = holder.querySelector("input[name=token]");
  if (!wanted || present) return;
  holder.append(el("label", {class: "token-field"}, el("span", {text: "admin token"}),
    el("input", {name: "token", type: "password", autocomplete: "off",
                 placeholder: "from `rc token --admin`"})));
}

function showError(text) {
  const node = document.getElementById("modal-error");
  node.hidden = !text;
  node.textContent = text || "";
}

function closeModal(done) {
  document.getElementById("modal").hidden = true;
  const resolve = modal.resolve, opener = modal.opener;
  modal.resolve = modal.run = modal.opener = null;
  // The keyboard goes back to the button that opened the dialog (found
  // again if the view was redrawn meanwhile), or to the view.
  if (currentRoute().kind !== "terminal") {
    if (opener) refocus(currentView(), opener);
    else currentView().focus({preventScroll: true});
  }
  if (resolve) resolve(done);
}

async function submitModal(event) {
  event.preventDefault();
  const values = {};
  for (const input of document.querySelectorAll("#modal-fields input"))
    values[input.name] = input.type === "checkbox" ? input.checked : input.value;
  if (values.token !== undefined) {
    if (!values.token.trim()) return showError("the admin token is needed for this");
    window.rcToken.set(values.token.trim());
  }
  try {
    const outcome = await modal.run(values);
    if (outcome.status === 401) {
      window.rcToken.set(null);
      tokenField(document.getElementById("modal-fields"), true);
      // The join token `make run` prints looks like the admin token: say which it was.
      return showError(/join token/.test(outcome.error || "") ? outcome.error
                       : "the admin token was not accepted; give it again");
    }
    if (!outcome.ok) return showError(outcome.error || "refused");
    closeModal(true);
    if (outcome.after) outcome.after();
    refreshSoon();
  } catch (e) {
    showError("cannot reach the main node: " + e);
  }
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: window.rcToken.headers(),
                                      body: JSON.stringify(body || {})});
  let answer = {};
  try { answer = await response.json(); } catch (e) { /* the status says enough */ }
  return {ok: response.ok, status: response.status, error: answer.error, body: answer};
}

function refreshSoon() {
  if (objectView) {
    delete document.getElementById("view-object").dataset.shown;
    objectView.loaded = false;
    objectView.again();          // now, not at the next tick: the button pressed said it was done
  }
  fetchOverview();
}

function cancelTask(id) {
  confirmAction({title: "Cancel task " + id + "?", text: "A running task is stopped on its device.",
                 fields: [], run: () => post("/api/v1/tasks/" + id + "/cancel")});
}

function cancelGroup(id, what, left) {
  confirmAction({title: "Cancel the rest of " + what.toLowerCase() + "?",
                 text: left + (left === 1 ? " task has" : " tasks have") + " not ended: the queued ones are"
                       + " cancelled, the running ones stopped on their devices. Those that ended stay.",
                 fields: [], run: () => post("/api/v1/groups/" + id + "/cancel")});
}

function retrySpec(task) {
  const spec = {task_type: task.task_type, payload: task.payload, priority: task.priority,
                requirements: task.requirements || {}, retry_on_failure: Boolean(task.retry_on_failure)};
  if (task.timeout !== null && task.timeout !== undefined) spec.timeout = task.timeout;
  if (task.max_retries !== null && task.max_retries !== undefined) spec.retries = task.max_retries;
  return spec;
}

function retryTask(task) {
  confirmAction({title: "Retry task " + task.task_id + "?",
                 text: "A copy is submitted as a new task; this one stays as it is.", fields: [],
                 run: async () => {
                   // Read again with the token the copy goes with: a view drawn without
                   // it shows each --env value as "(withheld)", not the value.
                   const [status, fresh] = await getJSON("/api/v1/tasks/" + task.task_id);
                   if (status !== 200) return {ok: false, status: status, error: fresh.error};
                   const outcome = await post("/api/v1/tasks", retrySpec(fresh));
                   if (outcome.ok) outcome.after = () => { location.hash = "#/task/" + outcome.body.task_id; };
                   return outcome;
                 }});
}

function drainDevice(id) {
  confirmAction({title: "Drain " + id + "?", text: "It takes no new tasks; its running ones finish.",
                 fields: [{name: "now", type: "checkbox", label: "now: hand its tasks back to the queue"}],
                 run: values => post("/api/v1/devices/" + encodeURIComponent(id) + "/drain",
                                     {now: Boolean(values.now)})});
}

function resumeDevice(id) {
  confirmAction({title: "Resume " + id + "?", text: "It takes new tasks again.", fields: [],
                 run: () => post("/api/v1/devices/" + encodeURIComponent(id) + "/resume")});
}

function labelDevice(id, labels) {
  const now = Object.entries(labels || {}).map(([k, v]) => k + "=" + v).join(" ");
  confirmAction({title: "Labels of " + id, text: "KEY=VALUE separated by spaces; KEY= removes one."
                 + (now ? " Now: " + now : ""),
                 fields: [{name: "labels", label: "labels", placeholder: "disk=big room=attic"}],
                 run: values => {
                   const changes = {};
                   for (const word of values.labels.split(/\s+/).filter(Boolean)) {
                     const at = word.indexOf("=");
                     if (at <= 0) return Promise.resolve({ok: false, error: "not KEY=VALUE: " + word});
                     changes[word.slice(0, at)] = word.slice(at + 1);
                   }
                   return post("/api/v1/devices/" + encodeURIComponent(id) + "/labels", {labels: changes});
                 }});
}

// -- the extra keys under the terminal (phones have no Tab, arrows or Ctrl) ------------------

const EXTRA_KEYS = {tab: "\t", up: "\x1b[A", down: "\x1b[B", left: "\x1b[D", right: "\x1b[C",
                    "ctrl-c": "\x03", esc: "\x1b"};

function setUpExtraKeys() {
  for (const button of document.querySelectorAll("#extra-keys button")) {
    // pointerdown without focus: the terminal keeps the keyboard open
    button.addEventListener("pointerdown", event => event.preventDefault());
    button.addEventListener("click", () => {
      window.rcTerminal.key(EXTRA_KEYS[button.dataset.key]);
      window.rcTerm.focus();
    });
  }
}

// -- start -------------------------------------------------------------------------------------

// The stream opens once the overview could be read: a main node that wants
// the token first gets one request, not a stream that is refused again.
async function start() {
  await fetchOverview();
  if (connection !== "token") openStream();
}

document.getElementById("modal-form").addEventListener("submit", submitModal);
document.getElementById("modal-cancel").addEventListener("click", () => closeModal(false));
document.addEventListener("keydown", event => {
  const modalOpen = !document.getElementById("modal").hidden;
  if (event.key === "Escape" && modalOpen) return closeModal(false);
  // Typing on the overview goes to the terminal, as the page did before it had one.
  if (!document.getElementById("view-overview").hidden && !modalOpen && event.key.length === 1 &&
      !event.ctrlKey && !event.metaKey && !event.altKey &&
      !/^(INPUT|TEXTAREA|BUTTON|A)$/.test(event.target.tagName)) {
    event.preventDefault();
    location.hash = "#/terminal";
    route();                  // now, not at hashchange: the next key is the terminal's
    window.rcTerminal.key(event.key);
  }
});
window.addEventListener("hashchange", route);
window.addEventListener("rc-token", () => { if (connection === "token") start(); });
setUpExtraKeys();
setInterval(tickAges, TICK_MS);
route();
start();
})();
