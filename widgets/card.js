// aquin_nb live card (anywidget ESM). Charts arrive pre-rendered as SVG strings in
// the spec; tables are rendered here so they can be sorted, filtered and clicked.
//
// Everything else from the spec is built as DOM nodes: text through textContent,
// attributes through dataset/className/style, never through HTML strings. The spec
// may come from any client of the web mirror, and an escaped string is only safe
// where its escaping matches (a textContent round trip leaves `"` as is, so it
// once broke out of data-* attributes). The SVG is the exception: the server or
// the kernel draws it from the spec's numbers with every string escaped.

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function formatValue(value) {
  if (typeof value === "boolean") return value ? "yes" : "";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(4);
  return String(value);
}

function renderChips(spec) {
  const chips = element("div", "aquin-chips");
  for (const chip of spec.chips) {
    const span = element("span", chip.warn ? "aquin-chip aquin-warn" : "aquin-chip");
    span.append(`${chip.label} `, element("b", "", chip.value));
    chips.appendChild(span);
  }
  return chips;
}

function renderTable(section, model) {
  const wrapper = document.createElement("div");
  const filter = element("input", "aquin-filter");
  filter.placeholder = "filter rows…";
  const table = element("table", "aquin-table");
  // The values behind each header and row, so a click never parses them back from
  // an attribute.
  const columnOf = new WeakMap();
  const featureOf = new WeakMap();
  let rows = section.rows.slice();
  let sortKey = null;
  let descending = true;

  function headerRow() {
    const tr = document.createElement("tr");
    for (const column of section.columns) {
      const arrow = column === sortKey ? (descending ? " ▾" : " ▴") : "";
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
      featureOf.set(tr, key);
      if (key === model.get("selected")) tr.className = "aquin-selected";
    }
    for (const column of section.columns) {
      const td = element("td", "", formatValue(row[column]));
      if (column === "delta") td.className = row[column] > 0 ? "aquin-pos" : "aquin-neg";
      tr.appendChild(td);
    }
    return tr;
  }

  function draw() {
    const needle = filter.value.trim().toLowerCase();
    const shown = rows.filter((row) =>
      !needle || section.columns.some((c) => String(row[c]).toLowerCase().includes(needle)));
    const head = document.createElement("thead");
    head.appendChild(headerRow());
    const body = document.createElement("tbody");
    body.append(...shown.map(bodyRow));
    table.replaceChildren(head, body);
  }

  table.addEventListener("click", (event) => {
    const header = event.target.closest("th");
    if (header && columnOf.has(header)) {
      const column = columnOf.get(header);
      descending = sortKey === column ? !descending : true;
      sortKey = column;
      rows.sort((a, b) => (a[column] < b[column] ? 1 : a[column] > b[column] ? -1 : 0) * (descending ? 1 : -1));
      draw();
      return;
    }
    const row = event.target.closest("tr[data-feature]");
    if (row && featureOf.has(row) && section.select) {
      model.set("selected", Number(featureOf.get(row)));
      model.save_changes();
    }
  });
  filter.addEventListener("input", draw);
  model.on("change:selected", draw);
  draw();
  wrapper.append(filter, table);
  return wrapper;
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
      prompt.tokens.forEach((token, i) => {
        const value = Number(prompt[side][i]);
        const alpha = Math.max(0, Math.min(1, value / peak)).toFixed(2);
        const span = element("span", "", token);
        span.style.background = `rgba(214,69,80,${alpha})`;
        span.title = value.toFixed(3);
        line.appendChild(span);
      });
      block.appendChild(line);
    }
    return block;
  });
}

function render({ model, el }) {
  const spec = model.get("spec");
  const card = element("div", "aquin-card");
  card.dataset.kind = spec.kind;
  const heading = document.createElement("h3");
  heading.append(element("span", "aquin-kind", spec.kind.replace("_", " ")), String(spec.title));
  card.append(heading, renderChips(spec));
  if (spec.warning) card.appendChild(element("div", "aquin-chip aquin-warn", spec.warning));
  for (const section of spec.sections) {
    const box = element("div", "aquin-section");
    box.appendChild(element("h4", "", section.title));
    if (section.type === "table") box.appendChild(renderTable(section, model));
    // Drawn by the server (live_spec) or the kernel, strings escaped there.
    else if (section.svg) box.insertAdjacentHTML("beforeend", section.svg);
    else if (section.error) box.appendChild(element("div", "aquin-chip aquin-warn", section.error));
    card.appendChild(box);
  }
  const tokens = element("div", "aquin-section aquin-token-panel");
  function drawTokens() {
    const view = model.get("token_view");
    const error = model.get("error");
    if (error) tokens.replaceChildren(element("div", "aquin-chip aquin-warn", error));
    else if (view && view.prompts) {
      tokens.replaceChildren(
        element("h4", "", `Feature ${view.feature}: where it fires most`),
        ...renderTokenView(view),
      );
    } else tokens.replaceChildren();
  }
  model.on("change:token_view", drawTokens);
  model.on("change:error", drawTokens);
  drawTokens();
  card.appendChild(tokens);
  el.appendChild(card);
}

export default { render };
