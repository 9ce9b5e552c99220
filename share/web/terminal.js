// The dashboard: an xterm.js terminal that runs `rc` commands on the main node
// through POST /api/v1/command (the CLI's own implementation), plus a few
// commands of its own: help, clear, theme, monitor, login, logout.
// Everything from the cluster reaches the screen through term.write(), which
// draws text, never HTML.
"use strict";

const PROMPT = "rc> ";
const HISTORY_KEY = "rc.history";
const THEME_KEY = "rc.theme";
const TOKEN_KEY = "rc.adminToken";
const HISTORY_LIMIT = 500;
const COMPLETION_TTL_MS = 3000;        // how long Tab reuses the ids it fetched
const MONITOR_DEBOUNCE_MS = 150;       // redraw at most this often on a burst of events
const MONITOR_REFRESH_MS = 5000;       // redraw anyway, so ages and bars move
const THEMES = {
  matrix: {background: "#000000", foreground: "#33ff66", cursor: "#33ff66",
           selectionBackground: "#1a7f33", green: "#33ff66", brightGreen: "#99ffbb"},
  amber: {background: "#140c00", foreground: "#ffb000", cursor: "#ffb000",
          selectionBackground: "#7a5400", green: "#ffd060", yellow: "#ffe08a"},
  blue: {background: "#00142e", foreground: "#8fd0ff", cursor: "#ffffff",
         selectionBackground: "#1d4f8a", green: "#7fffb0", blue: "#5fb0ff"},
};
const LOCAL_COMMANDS = {
  help: "this help, then the rc commands",
  clear: "clear the screen (also Ctrl-L)",
  theme: "theme matrix|amber|blue: change colours (remembered)",
  monitor: "a live view of devices and tasks; any key leaves it",
  login: "give the admin token (needed to submit and cancel)",
  logout: "forget the admin token",
};

const term = new Terminal({cursorBlink: true, convertEol: false, scrollback: 5000,
                           fontFamily: "monospace", fontSize: 14,
                           theme: THEMES[savedTheme()]});
const fit = new FitAddon.FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();
window.addEventListener("resize", () => fit.fit());
window.rcTerm = term;   // for the browser tests and the curious

let line = "", cursor = 0, mode = "prompt", pending = null;
let history = loadHistory(), historyIndex = history.length, lastTab = "";
let completionCache = null, completionTime = 0, monitorState = null;

applyTheme(savedTheme());
term.writeln("Retire-Cluster. Type `help`; Tab completes, arrows recall.");
prompt();
term.focus();
term.onData(onData);

// -- storage ----------------------------------------------------------------------

function store(key, value) {
  try { value == null ? localStorage.removeItem(key) : localStorage.setItem(key, value); }
  catch (e) { /* private mode: nothing is remembered */ }
}

function load(key) {
  try { return localStorage.getItem(key); } catch (e) { return null; }
}

function loadHistory() {
  try { return JSON.parse(load(HISTORY_KEY) || "[]").filter(x => typeof x === "string"); }
  catch (e) { return []; }
}

function savedTheme() {
  const name = load(THEME_KEY);
  return THEMES[name] ? name : "matrix";
}

function token() { return load(TOKEN_KEY); }

// -- the line editor --------------------------------------------------------------

function prompt() {
  mode = "prompt";
  line = ""; cursor = 0;
  term.write(PROMPT);
}

function redraw() {
  const shown = mode === "token" ? "*".repeat(line.length) : line;
  const label = mode === "token" ? "admin token: " : PROMPT;
  term.write("\r\x1b[K" + label + shown);
  if (cursor < line.length) term.write("\x1b[" + (line.length - cursor) + "D");
}

function insert(text) {
  text = text.replace(/[\x00-\x1f\x7f]/g, "");
  line = line.slice(0, cursor) + text + line.slice(cursor);
  cursor += text.length;
  redraw();
}

function onData(data) {
  if (mode === "monitor") return stopMonitor();
  if (mode === "busy") return;
  if (data !== "\t") lastTab = "";
  switch (data) {
    case "\r": return enter();
    case "\x7f": case "\b":
      if (cursor > 0) { line = line.slice(0, cursor - 1) + line.slice(cursor); cursor--; redraw(); }
      return;
    case "\x1b[3~":
      line = line.slice(0, cursor) + line.slice(cursor + 1); redraw(); return;
    case "\t": return mode === "prompt" ? complete() : undefined;
    case "\x1b[A": return recall(-1);
    case "\x1b[B": return recall(1);
    case "\x1b[C": if (cursor < line.length) { cursor++; term.write(data); } return;
    case "\x1b[D": if (cursor > 0) { cursor--; term.write(data); } return;
    case "\x1b[H": case "\x1bOH": case "\x01": cursor = 0; redraw(); return;
    case "\x1b[F": case "\x1bOF": case "\x05": cursor = line.length; redraw(); return;
    case "\x15": line = line.slice(cursor); cursor = 0; redraw(); return;
    case "\x0c": term.clear(); redraw(); return;
    case "\x03":
      term.write("^C\r\n");
      if (mode === "token") { pending = null; term.writeln("no token given"); }
      return prompt();
  }
  if (data.startsWith("\x1b")) return;   // other keys: nothing to do
  insert(data);
}

function recall(step) {
  if (mode !== "prompt" || !history.length) return;
  historyIndex = Math.min(Math.max(historyIndex + step, 0), history.length);
  line = historyIndex < history.length ? history[historyIndex] : "";
  cursor = line.length;
  redraw();
}

function remember(text) {
  if (history[history.length - 1] !== text) history.push(text);
  history = history.slice(-HISTORY_LIMIT);
  historyIndex = history.length;
  store(HISTORY_KEY, JSON.stringify(history));
}

function enter() {
  const text = line;
  term.write("\r\n");
  if (mode === "token") {
    store(TOKEN_KEY, text.trim() || null);
    const retry = pending;
    pending = null;
    if (retry) return runRemote(retry);
    term.writeln(text.trim() ? "token kept in this browser" : "no token given");
    return prompt();
  }
  if (!text.trim()) return prompt();
  remember(text);
  run(text.trim());
}

function askToken(retry) {
  pending = retry;
  mode = "token";
  line = ""; cursor = 0;
  term.writeln("This needs the admin token (`rc token --admin` on the main node).");
  redraw();
}

// -- commands ---------------------------------------------------------------------

function run(text) {
  const words = text.split(/\s+/);
  const name = words[0];
  if (name === "help" && words.length === 1) {
    term.writeln("In this terminal:");
    for (const [command, what] of Object.entries(LOCAL_COMMANDS))
      term.writeln("  " + command.padEnd(9) + what);
    term.writeln("");
    return runRemote("--help");
  }
  if (name === "help") return runRemote(words.slice(1).join(" ") + " --help");
  if (name === "clear") { term.clear(); term.write("\x1b[2K\r"); return prompt(); }
  if (name === "theme") return theme(words[1]);
  if (name === "monitor" && words.length === 1) return startMonitor();
  if (name === "login") return askToken(null);
  if (name === "logout") return logout();
  runRemote(text);
}

async function logout() {
  store(TOKEN_KEY, null);
  try { await fetch("/api/v1/stream-session", {method: "DELETE"}); } catch (e) { /* offline */ }
  term.writeln("token forgotten");
  prompt();
}

function theme(name) {
  if (!THEMES[name]) {
    term.writeln("theme: one of " + Object.keys(THEMES).join(", ") + " (now " + savedTheme() + ")");
    return prompt();
  }
  store(THEME_KEY, name);
  applyTheme(name);
  term.writeln("theme " + name);
  prompt();
}

function applyTheme(name) {
  term.options.theme = THEMES[name];
  document.body.className = "theme-" + name;
}

function headers() {
  const result = {"Content-Type": "application/json"};
  if (token()) result["Authorization"] = "Bearer " + token();
  return result;
}

async function command(text) {
  const response = await fetch("/api/v1/command", {
    method: "POST", headers: headers(),
    body: JSON.stringify({command: text, width: term.cols, colour: true})});
  let body = {};
  try { body = await response.json(); } catch (e) { body = {error: response.statusText}; }
  return [response.status, body];
}

function show(text, colour) {
  if (!text) return;
  text = text.replace(/\r?\n/g, "\r\n");
  term.write(colour ? "\x1b[" + colour + "m" + text + "\x1b[0m" : text);
}

async function runRemote(text) {
  mode = "busy";
  try {
    const [status, body] = await command(text);
    if (status === 401) {
      if (token()) term.writeln("\x1b[31mthe admin token was not accepted\x1b[0m");
      return askToken(text);
    }
    if (status !== 200) show("rc: " + (body.error || "HTTP " + status) + "\n", 31);
    else { show(body.output); show(body.error, 31); }
  } catch (e) {
    show("rc: cannot reach the main node: " + e + "\n", 31);
  }
  prompt();
}

// -- completion -------------------------------------------------------------------

async function completionWords() {
  if (completionCache && Date.now() - completionTime < COMPLETION_TTL_MS) return completionCache;
  const response = await fetch("/api/v1/completion", {headers: headers()});
  if (!response.ok) throw new Error("completion: HTTP " + response.status);
  completionCache = await response.json();
  completionTime = Date.now();
  return completionCache;
}

function candidatesFor(words, current, data) {
  const kinds = {device: data.devices.map(String), task: data.tasks.map(String)};
  const pick = value => Array.isArray(value) ? value : (kinds[value] || []);
  if (words.length === 1)
    return Object.keys(data.commands).concat(Object.keys(LOCAL_COMMANDS));
  const name = words[0], previous = words[words.length - 2];
  if (name === "theme") return Object.keys(THEMES);
  if (name === "help") return Object.keys(data.commands);
  if (current.startsWith("-")) return data.commands[name] || [];
  if (previous && previous.startsWith("-") && data.values[previous] !== undefined)
    return pick(data.values[previous]);
  const positional = words.slice(1, -1).filter(w => !w.startsWith("-")).length;
  return positional === 0 ? pick(data.positional[name]) : [];
}

async function complete() {
  const before = line.slice(0, cursor);
  const words = before.split(/\s+/);
  const current = words[words.length - 1];
  let data;
  try { data = await completionWords(); }
  catch (e) { return; }
  const matches = [...new Set(candidatesFor(words, current, data))]
    .filter(word => word.startsWith(current)).sort();
  if (!matches.length) return;
  if (matches.length === 1) return insert(matches[0].slice(current.length) + " ");
  const common = matches.reduce((a, b) => { let i = 0; while (i < a.length && a[i] === b[i]) i++; return a.slice(0, i); });
  if (common.length > current.length) return insert(common.slice(current.length));
  if (lastTab === before) {   // second Tab: show the choices
    term.write("\r\n" + matches.join("  ") + "\r\n");
    redraw();
  }
  lastTab = before;
}

// -- monitor ----------------------------------------------------------------------

// EventSource cannot send a header, and a token in a URL ends up in history
// and logs: with a token, the page first asks for an HttpOnly cookie that lets
// this browser read /stream/*, then opens the streams with their plain paths.
async function streamSession() {
  if (!token()) return;
  try { await fetch("/api/v1/stream-session", {method: "POST", headers: headers()}); }
  catch (e) { /* the streams say what is wrong */ }
}

async function startMonitor() {
  mode = "monitor";
  const state = {sources: [], timer: null, refresh: null, drawing: false, again: false};
  monitorState = state;
  const later = () => {
    if (state.timer === null) state.timer = setTimeout(() => { state.timer = null; draw(state); },
                                                       MONITOR_DEBOUNCE_MS);
  };
  draw(state);
  await streamSession();
  if (monitorState !== state) return;   // left before the cookie came
  for (const path of ["/stream/devices", "/stream/tasks"]) {
    const source = new EventSource(path);
    source.addEventListener("device", later);
    source.addEventListener("task", later);
    state.sources.push(source);
  }
  state.refresh = setInterval(later, MONITOR_REFRESH_MS);
}

async function draw(state) {
  if (monitorState !== state) return;
  if (state.drawing) { state.again = true; return; }
  state.drawing = true;
  try {
    const [status, body] = await command("monitor --once");
    if (monitorState !== state) return;
    term.write("\x1b[H\x1b[2J");
    if (status === 200) show(body.output + body.error);
    else show("monitor: " + (body.error || "HTTP " + status) + "\n", 31);
    term.write("\r\n\x1b[2m(live; press any key to leave)\x1b[0m");
  } catch (e) {
    if (monitorState === state) show("monitor: " + e + "\n", 31);
  } finally {
    state.drawing = false;
    if (state.again) { state.again = false; draw(state); }
  }
}

function stopMonitor() {
  const state = monitorState;
  monitorState = null;
  for (const source of state.sources) source.close();
  clearTimeout(state.timer);
  clearInterval(state.refresh);
  term.write("\r\n");
  prompt();
}
