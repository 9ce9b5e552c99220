// The dashboard's terminal: an xterm.js terminal that runs `rc` commands on
// the main node through POST /api/v1/command (the CLI's own implementation),
// plus a few commands of its own: help, clear, theme, monitor, login, logout.
// Everything from the cluster reaches the screen through term.write(), which
// draws text, never HTML. dashboard.js shows it (window.rcTerminal) and
// shares the admin token it keeps (rcToken).
"use strict";

(() => {   // its own scope: the page's other script (the dashboard) has names of its own

const PROMPT = "rc> ";
const TOKEN_PROMPT = "admin token (Esc cancels): ";
const HISTORY_KEY = "rc.history";
const THEME_KEY = "rc.theme";
const TOKEN_KEY = "rc.adminToken";
const HISTORY_LIMIT = 500;
const COMPLETION_TTL_MS = 3000;        // how long Tab reuses the ids it fetched
const MONITOR_DEBOUNCE_MS = 150;       // redraw at most this often on a burst of events
const MONITOR_REFRESH_MS = 5000;       // redraw anyway, so ages and bars move
const WAIT_POLL_MS = 500;              // how often `submit --wait` asks for the result
const SPINNER_MS = 120;                // one frame of the spinner
const SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏";
const TERMINAL_STATES = ["completed", "failed", "timed_out", "cancelled"];
// A font whose underscore stays inside its cell, and a line a little taller
// than the glyphs: with the default `monospace` at line height 1, xterm.js's
// DOM renderer clips `_` (x86_64 read "x86 64", python_eval "python eval").
const FONT_FAMILY = '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, "Courier New", monospace';
const LINE_HEIGHT = 1.2;
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
// Words in the output that become links to the dashboard's views.
const TASK_WORD = /\b(?:task[ _]?(?:id)?[ =:#]*|tasks\/)(\d+)\b/gi;
const GROUP_WORD = /\b(?:group|map)[ _]?(?:id)?[ =:#]*(\d+)\b/gi;
const TABLE_ROW_ID = /^\s*(\d+)\s+\S+\s+(?:queued|assigned|running|completed|failed|timed_out|cancelled)\b/;
const ID_CHARACTER = /[A-Za-z0-9._-]/;

const term = new Terminal({cursorBlink: true, convertEol: false, scrollback: 5000,
                           fontFamily: FONT_FAMILY, fontSize: 14, lineHeight: LINE_HEIGHT,
                           theme: THEMES[savedTheme()]});
const fit = new FitAddon.FitAddon();
term.loadAddon(fit);
window.rcTerm = term;   // for the browser tests and the curious

let line = "", cursor = 0, mode = "prompt", pending = null, opened = false;
let history = loadHistory(), historyIndex = history.length, lastTab = "";
let completionCache = null, completionTime = 0, monitorState = null, busy = null;
let refusedCommands = null, adminCommands = [];
const knownTasks = new Set(), knownDevices = new Set();

term.writeln("Retire-Cluster. Type `help`; Tab completes, arrows recall.");
prompt();
term.onData(onData);
learnCommands();
term.registerLinkProvider({provideLinks: provideLinks});

window.rcTerminal = {
  show() {
    if (!opened) {
      opened = true;
      term.open(document.getElementById("terminal"));
      applyTheme(savedTheme());
      window.addEventListener("resize", () => fit.fit());
    }
    fit.fit();
    term.focus();
  },
  key(data) { onData(data); },
  know(taskIds, deviceIds) {
    for (const id of taskIds) knownTasks.add(String(id));
    for (const id of deviceIds) knownDevices.add(String(id));
  },
};
window.rcToken = {get: token, set: keepToken, headers: headers};

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

// The page's other half (the overview) starts reading when a token arrives.
function keepToken(value) {
  store(TOKEN_KEY, value || null);
  if (value) window.dispatchEvent(new Event("rc-token"));
}

// -- the line editor --------------------------------------------------------------

function prompt() {
  mode = "prompt";
  line = ""; cursor = 0;
  term.write(PROMPT);
}

function redraw() {
  const shown = mode === "token" ? "*".repeat(line.length) : line;
  const label = mode === "token" ? TOKEN_PROMPT : PROMPT;
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
  if (mode === "busy") return data === "\x03" ? stopWaiting() : undefined;
  if (mode === "token" && (data === "\x1b" || data === "\x03")) return leaveTokenPrompt();
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
    case "\x03": term.write("^C\r\n"); return prompt();
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
  if (mode === "token") return tokenGiven(text.trim());
  if (!text.trim()) return prompt();
  remember(text);
  run(text.trim());
}

// -- the token prompt: Esc, Ctrl-C or an empty line leave it ----------------------

function askToken(retry) {
  pending = retry;
  mode = "token";
  line = ""; cursor = 0;
  term.writeln("This needs the admin token (`rc token --admin` on the main node);"
               + " Esc or Ctrl-C goes back.");
  redraw();
}

function leaveTokenPrompt() {
  term.write("\r\n");
  pending = null;
  term.writeln("no token given");
  prompt();
}

function tokenGiven(text) {
  const retry = pending;
  pending = null;
  if (!text) { term.writeln("no token given"); return prompt(); }
  keepToken(text);
  if (retry) return run(retry, true);
  term.writeln("token kept in this browser");
  prompt();
}

// -- commands ---------------------------------------------------------------------

function run(text, justGiven) {
  const words = typedWords(text);
  const name = words[0];
  if (name === "help" && words.length === 1) return help();
  if (name === "help") return runRemote(words.slice(1).join(" ") + " --help");
  if (name === "clear") { term.clear(); term.write("\x1b[2K\r"); return prompt(); }
  if (name === "theme") return theme(words[1]);
  if (name === "monitor" && words.length === 1) return startMonitor();
  if (name === "login") return askToken(null);
  if (name === "logout") return logout();
  if (!token() && adminCommands.includes(name) && !words.includes("--help"))
    return askToken(text);      // no request that is sure to be refused
  if (name === "submit" && words.includes("--wait") && !words.includes("--each"))
    return submitAndWait(words, justGiven);
  runRemote(text, justGiven);
}

async function help() {
  term.writeln("In this terminal:");
  for (const [command, what] of Object.entries(LOCAL_COMMANDS))
    term.writeln("  " + command.padEnd(9) + what);
  term.writeln("");
  const waiting = startBusy("");
  await learnCommands();
  let answer = null;
  try { answer = await command("--help", waiting.controller.signal); }
  catch (e) { /* said below */ }
  if (!endBusy(waiting)) return;
  if (!answer || answer[0] !== 200) show("rc: cannot read the commands' help\n", 31);
  else show(dimRefused(answer[1].output));
  if (refusedCommands) {
    term.writeln("\r\nNot in the browser (dimmed above; run them with `rc` on the main node):");
    for (const [name, why] of Object.entries(refusedCommands))
      if (!(name in LOCAL_COMMANDS)) term.writeln("  " + name.padEnd(13) + why);
  }
  prompt();
}

// The help's lines of the commands the browser refuses, dimmed.
function dimRefused(text) {
  if (!refusedCommands) return text;
  return text.split("\n").map(row => {
    const name = (row.match(/^ {4}(\S+)/) || [])[1];
    return name && name in refusedCommands && !(name in LOCAL_COMMANDS)
      ? "\x1b[2m" + row + "\x1b[0m" : row;
  }).join("\n");
}

// Which commands the browser may not run, and which need the admin token.
async function learnCommands() {
  if (refusedCommands) return;
  try {
    const response = await fetch("/api/v1/terminal", {headers: headers()});
    if (!response.ok) return;
    const body = await response.json();
    refusedCommands = body.refused;
    adminCommands = body.admin;
  } catch (e) { /* the server says so when it refuses */ }
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
  document.body.classList.remove(...Object.keys(THEMES).map(n => "theme-" + n));
  document.body.classList.add("theme-" + name);
}

function headers() {
  const result = {"Content-Type": "application/json"};
  if (token()) result["Authorization"] = "Bearer " + token();
  return result;
}

async function command(text, signal) {
  const response = await fetch("/api/v1/command", {
    method: "POST", headers: headers(), signal: signal,
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

// A command the server refused for the token: a stored token that no longer
// works is forgotten and a new one asked for, once; a token just given and
// refused is forgotten too, and the next line is a command again.
function refusedToken(text, justGiven, error) {
  if (token()) {
    store(TOKEN_KEY, null);
    // The join token `make run` prints looks like the admin token: say which it was.
    term.writeln("\x1b[31m" + (/join token/.test(error || "") ? error + " (forgotten)"
                                : "the admin token was not accepted (forgotten)")
                 + (justGiven ? "; `login` to give another" : "") + "\x1b[0m");
  }
  if (justGiven) return prompt();
  askToken(text);
}

async function runRemote(text, justGiven) {
  const waiting = startBusy("");
  try {
    const [status, body] = await command(text, waiting.controller.signal);
    if (!endBusy(waiting)) return;
    if (status === 401) return refusedToken(text, justGiven, body.error);
    if (status !== 200) show("rc: " + (body.error || "HTTP " + status) + "\n", 31);
    else { show(body.output); show(body.error, 31); }
    noteSubmitted(text, status === 200 ? body.output : "");
  } catch (e) {
    if (!endBusy(waiting)) return;
    show("rc: cannot reach the main node: " + e + "\n", 31);
  }
  prompt();
}

function noteSubmitted(text, output) {
  const id = /^submit\b/.test(text) && (output || "").trim();
  if (id && /^\d+$/.test(id)) knownTasks.add(id);
}

// -- waiting: a spinner, and Ctrl-C stops waiting ----------------------------------

function startBusy(label) {
  const waiting = {controller: new AbortController(), frame: 0, label: label, timer: null,
                   stopped: false, drawn: false};
  busy = waiting;
  mode = "busy";
  waiting.timer = setInterval(() => spin(waiting), SPINNER_MS);
  return waiting;
}

function spin(waiting) {
  waiting.frame = (waiting.frame + 1) % SPINNER.length;
  waiting.drawn = true;
  term.write("\r\x1b[K\x1b[2m" + SPINNER[waiting.frame] + " " + (waiting.label || "working")
             + " (Ctrl-C stops waiting)\x1b[0m");
}

// False when the user stopped waiting (Ctrl-C already said so).
function endBusy(waiting) {
  clearInterval(waiting.timer);
  if (waiting.stopped) return false;
  if (waiting.drawn) term.write("\r\x1b[K");
  busy = null;
  return true;
}

function stopWaiting() {
  const waiting = busy;
  busy = null;
  if (!waiting) return;
  waiting.stopped = true;
  clearInterval(waiting.timer);
  waiting.controller.abort();
  term.write("\r\x1b[K^C stopped waiting" + (waiting.taskId
    ? "; task " + waiting.taskId + " goes on (`task " + waiting.taskId + "` shows it)"
    : "; what was asked may still happen on the main node") + "\r\n");
  prompt();
}

// `submit ... --wait` submits, then waits here (not in the request), so the
// terminal keeps a spinner and Ctrl-C, and a long task is no timeout.
async function submitAndWait(words, justGiven) {
  const timeoutAt = words.indexOf("--wait-timeout");
  const limit = timeoutAt > 0 ? parseFloat(words[timeoutAt + 1]) : NaN;
  const submit = words.filter((w, i) => w !== "--wait" &&
                              !(timeoutAt > 0 && (i === timeoutAt || i === timeoutAt + 1)));
  const waiting = startBusy("submitting");
  try {
    const [status, body] = await command(submit.join(" "),
                                         waiting.controller.signal);
    if (waiting.stopped) return;
    const taskId = status === 200 && (body.output || "").trim();
    if (status === 401) { endBusy(waiting); return refusedToken(words.join(" "), justGiven, body.error); }
    if (!taskId || !/^\d+$/.test(taskId)) {
      endBusy(waiting);
      if (status !== 200) show("rc: " + (body.error || "HTTP " + status) + "\n", 31);
      else { show(body.output); show(body.error, 31); }
      return prompt();
    }
    knownTasks.add(taskId);
    waiting.taskId = taskId;
    waiting.label = "waiting for task " + taskId;
    const task = await resultOf(taskId, waiting, limit);
    if (!endBusy(waiting)) return;
    reportOutcome(taskId, task);
  } catch (e) {
    if (!endBusy(waiting)) return;
    show("rc: cannot reach the main node: " + e + "\n", 31);
  }
  prompt();
}

// The words of a command line as typed, quotes and all: split where the
// main node's shlex will split it (whitespace outside quotes, not after a
// backslash), so that words taken out of it leave the rest as it was.
function typedWords(text) {
  const words = [];
  let word = "", quote = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "\\" && quote !== "'" && i + 1 < text.length) {
      word += c + text[++i];
    } else if (quote) {
      if (c === quote) quote = null;
      word += c;
    } else if (/\s/.test(c)) {
      if (word) words.push(word);
      word = "";
    } else {
      if (c === "'" || c === '"') quote = c;
      word += c;
    }
  }
  return word ? words.concat([word]) : words;
}

// The task's record, polled until it ends (GET .../result would answer 409
// until then, an error in the browser's console each time).
async function resultOf(taskId, waiting, limitSeconds) {
  const started = Date.now();
  for (;;) {
    const response = await fetch("/api/v1/tasks/" + taskId,
                                 {headers: headers(), signal: waiting.controller.signal});
    const task = await response.json();
    if (response.status !== 200 || TERMINAL_STATES.includes(task.state)) return [response.status, task];
    if (limitSeconds >= 0 && Date.now() - started > limitSeconds * 1000) return [409, task];
    await new Promise(resolve => setTimeout(resolve, WAIT_POLL_MS));
    if (waiting.stopped) throw new Error("stopped");
  }
}

// What a device chose (a task's output, its error), every control character
// but line ends and tabs shown as "?", as `rc` shows it on a terminal
// (render.printable): an escape sequence could clear the screen, draw a
// prompt of its own, or put a link on the screen.
function printable(text) {
  return text.replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f]/g, "?");
}

function reportOutcome(taskId, [status, task]) {
  if (status !== 200) {
    return show(status === 409 ? "rc: error: task " + taskId + " is still " + task.state
                + "; gave up waiting\n" : "rc: " + (task.error || "HTTP " + status) + "\n", 31);
  }
  const output = printable((task.result && task.result.output) || "");
  show(output && !output.endsWith("\n") ? output + "\n" : output);
  if (task.state !== "completed") {
    const text = printable(task.error || (task.result && task.result.stderr) || task.reason || "");
    const lines = text.split("\n").map(l => l.trim()).filter(Boolean);
    show("rc: error: task " + taskId + " " + task.state
         + (lines.length ? ": " + lines[lines.length - 1] : "") + "\n", 31);
  }
}

// -- links in the output ---------------------------------------------------------

function provideLinks(y, callback) {
  const row = term.buffer.active.getLine(y - 1);
  const text = row ? row.translateToString(true) : "";
  const links = [];
  const add = (start, word, hash) => links.push({
    range: {start: {x: start + 1, y: y}, end: {x: start + word.length, y: y}}, text: word,
    decorations: {underline: true, pointerCursor: true},
    activate: () => { location.hash = hash; }});
  for (const match of text.matchAll(TASK_WORD))
    add(match.index + match[0].length - match[1].length, match[1], "#/task/" + match[1]);
  for (const match of text.matchAll(GROUP_WORD))
    add(match.index + match[0].length - match[1].length, match[1], "#/group/" + match[1]);
  const tableRow = text.match(TABLE_ROW_ID), bare = text.match(/^\s*(\d+)\s*$/);
  const id = tableRow ? tableRow[1] : (bare && knownTasks.has(bare[1]) ? bare[1] : null);
  if (id) add(text.indexOf(id), id, "#/task/" + id);
  for (const device of knownDevices) {
    let at = text.indexOf(device);
    while (at >= 0) {
      const before = text[at - 1], after = text[at + device.length];
      if (!(before && ID_CHARACTER.test(before)) && !(after && ID_CHARACTER.test(after)))
        add(at, device, "#/device/" + encodeURIComponent(device));
      at = text.indexOf(device, at + device.length);
    }
  }
  callback(links.length ? links : undefined);
}

// -- completion -------------------------------------------------------------------

async function completionWords() {
  if (completionCache && Date.now() - completionTime < COMPLETION_TTL_MS) return completionCache;
  const response = await fetch("/api/v1/completion", {headers: headers()});
  if (!response.ok) throw new Error("completion: HTTP " + response.status);
  completionCache = await response.json();
  completionTime = Date.now();
  window.rcTerminal.know(completionCache.tasks, completionCache.devices);
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
window.rcStreamSession = streamSession;

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
})();
