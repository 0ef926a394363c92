// aquin_nb live card (anywidget ESM). Charts arrive pre-rendered as SVG strings in
// the spec; tables are rendered here so they can be sorted, filtered, paged and clicked.
//
// Everything else from the spec is built as DOM nodes: text through textContent,
// attributes through dataset/className/style, never through HTML strings. The spec
// may come from any client of the web mirror, and an escaped string is only safe
// where its escaping matches (a textContent round trip leaves `"` as is, so it
// once broke out of data-* attributes). The SVG is the exception: the server or
// the kernel draws it from the spec's numbers with every string escaped.
//
// Two kinds of model drive this file. The notebook widget (aquin_nb/cards/widget.py)
// answers in Python: it pages, sorts and filters the main table over every row of
// the result (`query` → `page_rows`, `total`, `row_count`, `page`) and answers a
// selection with `token_view` and `dashboard`. The web mirror's model holds the spec
// alone: tables are sorted and filtered here, and a selection opens what the spec
// carries. A model that answers is recognised by its `paged_section` and `dashboard`.

const SVG_NS = "http://www.w3.org/2000/svg";
const SHADE = "214,69,80";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function formatValue(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "boolean") return value ? "yes" : "";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(4);
  return String(value);
}

function count(value) {
  return Number(value).toLocaleString("en-US");
}

function renderChips(spec) {
  const chips = element("div", "aquin-chips");
  for (const chip of spec.chips || []) {
    const span = element("span", chip.warn ? "aquin-chip aquin-warn" : "aquin-chip");
    span.append(`${chip.label} `, element("b", "", chip.value));
    chips.appendChild(span);
  }
  return chips;
}

function renderHeadline(spec) {
  const box = element("div", "aquin-headline");
  for (const line of spec.headline || []) box.appendChild(element("div", "", line));
  return box;
}

// ------------------------------------------------------------------ token views, dashboards

function shaded(token, value, peak) {
  const span = element("span", "", token);
  const alpha = Math.max(0, Math.min(1, Number(value) / peak)).toFixed(2);
  span.style.background = `rgba(${SHADE},${alpha})`;
  span.title = Number(value).toFixed(3);
  return span;
}

function renderTokenView(view) {
  let peak = 0;
  for (const prompt of view.prompts) {
    for (const value of prompt.base.concat(prompt.checkpoint)) peak = Math.max(peak, value);
  }
  peak = peak || 1;
  return view.prompts.map((prompt) => {
    const block = element("div", "aquin-tokens");
    for (const side of ["base", "checkpoint"]) {
      const line = document.createElement("div");
      line.append(element("b", "", side), " ");
      prompt.tokens.forEach((token, i) => line.appendChild(shaded(token, prompt[side][i], peak)));
      block.appendChild(line);
    }
    return block;
  });
}

function safeLink(url) {
  // Only a web address becomes a link: a `javascript:` URL in a spec must stay text.
  try {
    const parsed = new URL(String(url));
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function histogram(counts, width, height) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "aquin-dash-histogram");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  const values = (counts || []).map(Number);
  const peak = Math.max(1, ...values);
  const step = width / Math.max(1, values.length);
  values.forEach((value, i) => {
    const rect = document.createElementNS(SVG_NS, "rect");
    const tall = (value / peak) * (height - 2);
    rect.setAttribute("x", (i * step + 0.5).toFixed(1));
    rect.setAttribute("y", (height - tall).toFixed(1));
    rect.setAttribute("width", Math.max(0.5, step - 1).toFixed(1));
    rect.setAttribute("height", tall.toFixed(1));
    rect.setAttribute("fill", "#5b8def");
    svg.appendChild(rect);
  });
  return svg;
}

function lensLine(word, tokens) {
  const line = element("div", "aquin-lens");
  line.append(element("b", "", word), " ", (tokens || []).map((t) => t.token).join(" · "));
  return line;
}

function renderContexts(contexts) {
  if (!contexts || !contexts.length) return [element("div", "aquin-note", "never fires in this corpus")];
  return contexts.map((context) => {
    const line = element("div", "aquin-tokens");
    const peak = Math.max(0, ...context.acts.map(Number)) || 1;
    context.tokens.forEach((token, i) => {
      const span = shaded(token, context.acts[i], peak);
      if (i === context.peak) span.className = "aquin-peak";
      line.appendChild(span);
    });
    return line;
  });
}

function renderDashboard(board) {
  const box = element("div", "aquin-dash");
  box.dataset.dashboard = String(board.feature);
  const title = element("h4", "", `Feature ${board.feature}`);
  if (board.label) title.append(`: ${board.label}`);
  const href = board.url ? safeLink(board.url) : null;
  if (href) {
    const link = element("a", "", "Neuronpedia");
    link.href = href;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    title.append(" ", link);
  }
  const columns = element("div", "aquin-dash-cols");
  for (const side of ["base", "checkpoint"]) {
    const data = board[side];
    if (!data) continue;
    const column = element("div", "aquin-dash-side");
    column.dataset.side = side;
    const density = (Number(data.density) * 100).toFixed(2);
    column.append(
      element("h4", "", `${side}: fires on ${density}% of tokens`),
      histogram(data.histogram, 220, 40),
      lensLine("promotes", data.promoted),
      lensLine("suppresses", data.suppressed),
      ...renderContexts(data.contexts),
    );
    columns.appendChild(column);
  }
  box.append(title, columns);
  return box;
}

// ------------------------------------------------------------------ where a feature opens

// One panel per view of the card, moved to sit right below what was clicked: a detail
// row after the table row, or the bars chart's own section; at the bottom otherwise.
function makePicker(model, spec, card) {
  const answers = model.get("dashboard") !== undefined; // the notebook widget's kernel
  const panel = element("div", "aquin-section aquin-token-panel");
  const detail = element("tr", "aquin-detail");
  const cell = element("td", "");
  detail.appendChild(cell);
  const tables = new Map(); // section index → { rowFor(key), width }
  const charts = new Map(); // section index → the chart's section box
  let anchor = null; // { kind: "row" | "bars", section, key }
  const same = (a, b) => Object.is(a, b) || String(a) === String(b);

  function dashboard() {
    if (answers) return model.get("dashboard");
    return (spec.dashboards || {})[String(model.get("selected"))];
  }

  function content() {
    const error = model.get("error");
    if (error) return [element("div", "aquin-chip aquin-warn", error)];
    const parts = [];
    const board = dashboard();
    if (board && (board.base || board.checkpoint)) parts.push(renderDashboard(board));
    const view = model.get("token_view");
    if (view && view.prompts) {
      parts.push(element("h4", "", `Feature ${view.feature}: where it fires most`));
      parts.push(...renderTokenView(view));
    }
    return parts;
  }

  function place() {
    const parts = content();
    panel.replaceChildren(...parts);
    detail.remove();
    if (!parts.length) {
      card.appendChild(panel);
      return;
    }
    const table = anchor && anchor.kind === "row" ? tables.get(anchor.section) : null;
    const row = table ? table.rowFor(anchor.key) : null;
    if (row) {
      cell.setAttribute("colspan", String(table.width));
      cell.appendChild(panel);
      row.after(detail);
    } else if (anchor && anchor.kind === "bars" && charts.has(anchor.section)) {
      charts.get(anchor.section).appendChild(panel);
    } else {
      card.appendChild(panel);
    }
  }

  function choose(key, where) {
    const selected = model.get("selected");
    const again = anchor && anchor.kind === where.kind && anchor.section === where.section;
    if (again && same(anchor.key, key) && Object.is(Number(key), selected)) {
      model.set("selected", -1); // a second click on what is open closes it
    } else {
      anchor = { ...where, key };
      model.set("selected", Number(key));
    }
    model.save_changes();
    place(); // a real model fires no change when the same feature is picked elsewhere
  }

  function opens(key) {
    const known = model.get("opens");
    if (known && typeof known === "object") return known[String(key)] || [];
    const found = [];
    if ((spec.dashboards || {})[String(key)]) found.push("dashboard");
    if ((spec.token_views || {})[String(key)]) found.push("view");
    return found;
  }

  function movedElsewhere(mainTable) {
    // The selection came from elsewhere (the kernel, another view): open it by its row.
    const selected = model.get("selected");
    if (!anchor || !Object.is(Number(anchor.key), selected)) {
      anchor = selected >= 0 ? { kind: "row", section: mainTable, key: selected } : null;
    }
  }

  return { panel, tables, charts, place, choose, opens, movedElsewhere, answers };
}

// ------------------------------------------------------------------ tables

function renderTable(section, index, model, picker, paged) {
  const wrapper = element("div", "aquin-table-box");
  const controls = element("div", "aquin-controls");
  const filter = element("input", "aquin-filter");
  filter.placeholder = paged ? "filter: label text or feature id…" : "filter rows…";
  filter.setAttribute("aria-label", "filter rows");
  const status = element("span", "aquin-rowcount");
  const previous = element("button", "aquin-pager", "‹ previous");
  const next = element("button", "aquin-pager", "next ›");
  previous.type = next.type = "button";
  previous.dataset.step = "-1";
  next.dataset.step = "1";
  controls.append(filter, status);
  if (paged) controls.append(previous, next);
  const table = element("table", "aquin-table");
  // The values behind each header and row, so a click never parses them back from
  // an attribute.
  const columnOf = new WeakMap();
  const keyOf = new WeakMap();
  const local = { rows: (section.rows || []).slice(), sort: null, descending: true };
  let body = document.createElement("tbody");

  const query = () => ({ sort: null, descending: true, filter: "", page: 0, page_size: 25, ...(model.get("query") || {}) });
  const ask = (changes) => {
    model.set("query", { ...query(), ...changes });
    model.save_changes();
  };
  const sortState = () => (paged ? query() : local);

  function visibleRows() {
    if (paged) return model.get("page_rows") || [];
    const needle = filter.value.trim().toLowerCase();
    return local.rows.filter((row) =>
      !needle || section.columns.some((c) => String(row[c]).toLowerCase().includes(needle)));
  }

  function headerRow() {
    const tr = document.createElement("tr");
    const { sort, descending } = sortState();
    for (const column of section.columns) {
      const arrow = column === sort ? (descending ? " ▾" : " ▴") : "";
      const th = element("th", "", `${column}${arrow}`);
      th.dataset.column = String(column);
      columnOf.set(th, column);
      tr.appendChild(th);
    }
    return tr;
  }

  function bodyRow(row) {
    const tr = document.createElement("tr");
    const key = section.select ? row[section.select] : null;
    if (key !== null && key !== undefined) {
      tr.dataset.feature = String(key);
      keyOf.set(tr, key);
      if (key === model.get("selected")) tr.className = "aquin-selected";
      const opens = picker.opens(key);
      if (opens.length) {
        tr.dataset.opens = opens.join(" ");
        tr.title = opens.includes("dashboard") ? "click: its dashboard" : "click: its token view";
      }
    }
    for (const column of section.columns) {
      const td = element("td", "", formatValue(row[column]));
      if (column === "delta") td.className = row[column] > 0 ? "aquin-pos" : "aquin-neg";
      tr.appendChild(td);
    }
    return tr;
  }

  function describe(shown) {
    if (!paged) {
      const all = local.rows.length;
      return shown === all ? `${count(all)} rows` : `${count(shown)} of ${count(all)} rows match`;
    }
    const { page_size: size } = query();
    const total = Number(model.get("total")) || 0;
    const all = Number(model.get("row_count")) || 0;
    const page = Number(model.get("page")) || 0;
    const pages = Math.max(1, Math.ceil(total / size));
    previous.disabled = page <= 0;
    next.disabled = page >= pages - 1;
    const first = total ? page * size + 1 : 0;
    const last = Math.min(total, (page + 1) * size);
    const matching = total === all ? `${count(all)} rows` : `${count(total)} of ${count(all)} rows match`;
    return `${matching} · showing ${count(first)}–${count(last)} · page ${page + 1} of ${pages}`;
  }

  function draw() {
    const rows = visibleRows();
    const head = document.createElement("thead");
    head.appendChild(headerRow());
    body = document.createElement("tbody");
    body.append(...rows.map(bodyRow));
    table.replaceChildren(head, body);
    status.textContent = describe(rows.length);
    picker.place();
  }

  picker.tables.set(index, {
    width: section.columns.length,
    rowFor: (key) => [...body.children].find((tr) => keyOf.has(tr) && String(keyOf.get(tr)) === String(key)) || null,
  });

  table.addEventListener("click", (event) => {
    const header = event.target.closest("th");
    if (header && columnOf.has(header)) {
      const column = columnOf.get(header);
      const { sort, descending } = sortState();
      const order = sort === column ? !descending : true;
      if (paged) {
        ask({ sort: column, descending: order, page: 0 });
        return;
      }
      local.sort = column;
      local.descending = order;
      local.rows.sort((a, b) => (a[column] < b[column] ? 1 : a[column] > b[column] ? -1 : 0) * (order ? 1 : -1));
      draw();
      return;
    }
    const row = event.target.closest("tr[data-feature]");
    if (row && keyOf.has(row) && section.select) picker.choose(keyOf.get(row), { kind: "row", section: index });
  });
  let waiting = null;
  filter.addEventListener("input", () => {
    if (!paged) return draw();
    clearTimeout(waiting);
    waiting = setTimeout(() => ask({ filter: filter.value, page: 0 }), 150);
  });
  for (const button of [previous, next]) {
    button.addEventListener("click", () => {
      ask({ page: (Number(model.get("page")) || 0) + Number(button.dataset.step) });
    });
  }
  if (paged) {
    filter.value = query().filter || "";
    for (const key of ["page_rows", "total", "row_count", "page", "query"]) model.on(`change:${key}`, draw);
  }
  model.on("change:selected", draw);
  model.on("change:opens", draw);
  draw();
  wrapper.append(controls, table);
  return wrapper;
}

// ------------------------------------------------------------------ the card

function clickableBars(box, section, index, picker) {
  // Each bar's rect (and its label) is the bars' entry of the same index in the spec.
  const bars = section.bars || [];
  const svg = box.querySelector("svg");
  if (!svg) return;
  for (const shapes of [svg.querySelectorAll("rect"), svg.querySelectorAll("text")]) {
    shapes.forEach((shape, j) => {
      if (j >= bars.length) return;
      shape.classList.add("aquin-pickable");
      shape.addEventListener("click", () => picker.choose(bars[j].feature, { kind: "bars", section: index }));
    });
  }
}

function render({ model, el }) {
  const spec = model.get("spec");
  const card = element("div", "aquin-card");
  card.dataset.kind = spec.kind;
  const heading = document.createElement("h3");
  heading.append(element("span", "aquin-kind", spec.kind.replace("_", " ")), String(spec.title));
  card.append(heading);
  if ((spec.headline || []).length) card.appendChild(renderHeadline(spec));
  card.appendChild(renderChips(spec));
  if (spec.warning) card.appendChild(element("div", "aquin-chip aquin-warn", spec.warning));

  const picker = makePicker(model, spec, card);
  const paged = model.get("paged_section");
  const selectable = spec.sections.some((s) => s.type === "table" && s.select);
  const mainTable = typeof paged === "number" && paged >= 0 ? paged : spec.sections.findIndex((s) => s.type === "table" && s.select);
  const note = element("div", "aquin-note");
  function describeOpens() {
    if (spec.kind === "dashboards") {
      note.textContent = "Click a row to open that feature's dashboard right below it.";
      return;
    }
    const known = model.get("opens");
    const keys = known && typeof known === "object"
      ? Object.keys(known)
      : [...new Set([...Object.keys(spec.dashboards || {}), ...Object.keys(spec.token_views || {})])];
    const boards = keys.filter((key) => picker.opens(key).includes("dashboard")).length;
    const views = keys.filter((key) => picker.opens(key).includes("view")).length;
    note.textContent =
      `Click a row or a bar to open that feature right below it. ${count(boards)} ` +
      `feature${boards === 1 ? " has" : "s have"} a dashboard (◆), ${count(views)} a token view (▸)` +
      (picker.answers ? "; other token views are computed on click where the models are loaded." : ".");
  }
  if (selectable) {
    describeOpens();
    model.on("change:opens", describeOpens);
    card.appendChild(note);
  }

  spec.sections.forEach((section, index) => {
    const box = element("div", "aquin-section");
    box.appendChild(element("h4", "", section.title));
    if (section.type === "table") box.appendChild(renderTable(section, index, model, picker, index === paged));
    // Drawn by the server (live_spec) or the kernel, strings escaped there.
    else if (section.svg) {
      box.insertAdjacentHTML("beforeend", section.svg);
      if (section.type === "bars" && selectable) {
        clickableBars(box, section, index, picker);
        picker.charts.set(index, box);
      }
    } else if (section.error) box.appendChild(element("div", "aquin-chip aquin-warn", section.error));
    card.appendChild(box);
  });

  model.on("change:selected", () => {
    picker.movedElsewhere(mainTable);
    picker.place();
  });
  for (const key of ["token_view", "dashboard", "error"]) model.on(`change:${key}`, picker.place);
  picker.place();
  el.appendChild(card);
}

export default { render };
