// aquin_nb web mirror: one session's sync rows, updated live over server-sent events.
// An expanded row shows the invocation's card, drawn by the notebook widget's own
// card.js through a small model that holds the card spec. Everything from events
// reaches the page through textContent and dataset, never as HTML.

import card from "./card.js";

const config = JSON.parse(document.getElementById("aquin-config").textContent);
const api = `/api/sessions/${encodeURIComponent(config.session)}`;
const list = document.getElementById("aquin-rows");
const live = document.querySelector(".aquin-live");
const rows = new Map();
const LABELS = { invoked: "Invoked", completed: "Completed", failed: "Failed" };

function text(tag, className, value) {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = value == null ? "" : String(value);
  return node;
}

function specModel(spec) {
  // The anywidget model interface card.js uses, backed by the spec alone: a row
  // click shows a token view when the spec carries one.
  const state = { spec, selected: -1, token_view: {}, error: "" };
  const listeners = {};
  const fire = (key) => (listeners[`change:${key}`] || []).forEach((callback) => callback());
  return {
    get: (key) => state[key],
    set: (key, value) => {
      state[key] = value;
      fire(key);
      if (key === "selected") {
        const views = spec.token_views || {};
        state.token_view = views[String(value)] || {};
        fire("token_view");
      }
    },
    on: (event, callback) => { (listeners[event] = listeners[event] || []).push(callback); },
    save_changes: () => {},
  };
}

function describeArguments(args) {
  return Object.entries(args || {})
    .map(([key, value]) => `${key} = ${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join("\n");
}

async function loadPanel(row, panel) {
  panel.replaceChildren(text("p", "aquin-live", "loading…"));
  const response = await fetch(`${api}/invocations/${encodeURIComponent(row.dataset.invocation)}`);
  if (!response.ok) {
    panel.replaceChildren(text("p", "aquin-error", `could not load: HTTP ${response.status}`));
    return;
  }
  const detail = await response.json();
  panel.replaceChildren(text("pre", "aquin-arguments", describeArguments(detail.arguments)));
  if (detail.error) panel.appendChild(text("pre", "aquin-error", detail.error));
  if (detail.card) {
    const host = document.createElement("div");
    card.render({ model: specModel(detail.card), el: host });
    panel.appendChild(host);
  } else if (detail.status === "invoked") {
    panel.appendChild(text("p", "aquin-live", "running…"));
  }
  row.dataset.loaded = detail.status;
}

function rowFor(id) {
  let row = rows.get(id);
  if (row) return row;
  row = document.createElement("details");
  row.className = "aquin-sync-row";
  row.dataset.invocation = id;
  row.dataset.history = "";
  const summary = document.createElement("summary");
  summary.append(
    text("span", "aquin-status", ""),
    text("span", "aquin-tool", ""),
    text("span", "aquin-name", ""),
    text("span", "aquin-duration", ""),
    text("span", "aquin-when", ""),
  );
  const panel = document.createElement("div");
  panel.className = "aquin-panel";
  row.append(summary, panel);
  row.addEventListener("toggle", () => {
    if (row.open && row.dataset.loaded !== row.dataset.status) loadPanel(row, panel);
  });
  rows.set(id, row);
  list.prepend(row);
  return row;
}

function update(event) {
  const row = rowFor(event.invocation_id);
  let status = row.dataset.status || "invoked";
  if (event.type === "tool.result") status = event.status === "ok" ? "completed" : "failed";
  else if (event.status) status = event.status;
  const history = row.dataset.history ? row.dataset.history.split(" ") : [];
  if (history[history.length - 1] !== status) history.push(status);
  row.dataset.history = history.join(" ");
  row.dataset.status = status;
  row.dataset.tool = event.tool;
  row.querySelector(".aquin-status").textContent = Object.hasOwn(LABELS, status) ? LABELS[status] : status;
  row.querySelector(".aquin-tool").textContent = event.tool;
  if (event.name) row.querySelector(".aquin-name").textContent = event.name;
  const duration = event.duration_s;
  if (typeof duration === "number") row.querySelector(".aquin-duration").textContent = `${duration.toFixed(2)} s`;
  const when = event.time || event.started;
  if (when && !row.querySelector(".aquin-when").textContent) {
    row.querySelector(".aquin-when").textContent = new Date(when).toLocaleTimeString();
  }
  if (row.open && row.dataset.loaded !== status) loadPanel(row, row.querySelector(".aquin-panel"));
}

async function start() {
  const response = await fetch(`${api}/invocations`);
  if (!response.ok) {
    live.dataset.state = "error";
    live.textContent = `cannot load the session: HTTP ${response.status}`;
    return;
  }
  const initial = await response.json();
  for (const invocation of initial.invocations) {
    update({ ...invocation, type: invocation.status === "invoked" ? "tool.start" : "tool.result",
      status: invocation.status === "failed" ? "error" : invocation.status === "completed" ? "ok" : undefined,
      time: invocation.started });
  }
  const source = new EventSource(`${api}/stream?after=${initial.last_event}`);
  source.onopen = () => { live.dataset.state = "live"; live.textContent = "live"; };
  source.onerror = () => { live.dataset.state = "reconnecting"; live.textContent = "reconnecting…"; };
  for (const type of ["tool.start", "tool.result"]) {
    source.addEventListener(type, (message) => update(JSON.parse(message.data)));
  }
}

start();
