// aquin_nb live card (anywidget ESM). Charts arrive pre-rendered as SVG strings in
// the spec; tables are rendered here so they can be sorted, filtered and clicked.

function escapeText(value) {
  const div = document.createElement("div");
  div.textContent = String(value);
  return div.innerHTML;
}

function formatValue(value) {
  if (typeof value === "boolean") return value ? "yes" : "";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(4);
  return escapeText(value);
}

function renderChips(spec) {
  const chips = document.createElement("div");
  chips.className = "aquin-chips";
  for (const chip of spec.chips) {
    const span = document.createElement("span");
    span.className = chip.warn ? "aquin-chip aquin-warn" : "aquin-chip";
    span.innerHTML = `${escapeText(chip.label)} <b>${escapeText(chip.value)}</b>`;
    chips.appendChild(span);
  }
  return chips;
}

function renderTable(section, model) {
  const wrapper = document.createElement("div");
  const filter = document.createElement("input");
  filter.className = "aquin-filter";
  filter.placeholder = "filter rows…";
  const table = document.createElement("table");
  table.className = "aquin-table";
  let rows = section.rows.slice();
  let sortKey = null;
  let descending = true;

  function draw() {
    const needle = filter.value.trim().toLowerCase();
    const shown = rows.filter((row) =>
      !needle || section.columns.some((c) => String(row[c]).toLowerCase().includes(needle)));
    const head = section.columns
      .map((c) => `<th data-column="${escapeText(c)}">${escapeText(c)}${c === sortKey ? (descending ? " ▾" : " ▴") : ""}</th>`)
      .join("");
    const body = shown.map((row) => {
      const key = section.select ? row[section.select] : null;
      const selected = key !== null && key === model.get("selected") ? ' class="aquin-selected"' : "";
      const cells = section.columns.map((c) => {
        const css = c === "delta" ? (row[c] > 0 ? ' class="aquin-pos"' : ' class="aquin-neg"') : "";
        return `<td${css}>${formatValue(row[c])}</td>`;
      }).join("");
      return `<tr${key !== null ? ` data-feature="${escapeText(key)}"` : ""}${selected}>${cells}</tr>`;
    }).join("");
    table.innerHTML = `<thead><tr>${head}</tr></thead><tbody>${body}</tbody>`;
  }

  table.addEventListener("click", (event) => {
    const header = event.target.closest("th");
    if (header) {
      const column = header.dataset.column;
      descending = sortKey === column ? !descending : true;
      sortKey = column;
      rows.sort((a, b) => (a[column] < b[column] ? 1 : a[column] > b[column] ? -1 : 0) * (descending ? 1 : -1));
      draw();
      return;
    }
    const row = event.target.closest("tr[data-feature]");
    if (row && section.select) {
      model.set("selected", Number(row.dataset.feature));
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
  if (!view || !view.prompts) return "";
  let peak = 0;
  for (const prompt of view.prompts) {
    for (const value of prompt.base.concat(prompt.checkpoint)) peak = Math.max(peak, value);
  }
  peak = peak || 1;
  return view.prompts.map((prompt) => ["base", "checkpoint"].map((side) => {
    const spans = prompt.tokens.map((token, i) => {
      const alpha = Math.max(0, Math.min(1, prompt[side][i] / peak)).toFixed(2);
      return `<span style="background: rgba(214,69,80,${alpha})" title="${prompt[side][i].toFixed(3)}">${escapeText(token)}</span>`;
    }).join("");
    return `<div><b>${side}</b> ${spans}</div>`;
  }).join("")).map((lines) => `<div class="aquin-tokens">${lines}</div>`).join("");
}

function render({ model, el }) {
  const spec = model.get("spec");
  const card = document.createElement("div");
  card.className = "aquin-card";
  card.dataset.kind = spec.kind;
  card.innerHTML = `<h3><span class="aquin-kind">${escapeText(spec.kind.replace("_", " "))}</span>${escapeText(spec.title)}</h3>`;
  card.appendChild(renderChips(spec));
  if (spec.warning) {
    const warning = document.createElement("div");
    warning.className = "aquin-chip aquin-warn";
    warning.textContent = spec.warning;
    card.appendChild(warning);
  }
  for (const section of spec.sections) {
    const box = document.createElement("div");
    box.className = "aquin-section";
    box.innerHTML = `<h4>${escapeText(section.title)}</h4>`;
    if (section.type === "table") box.appendChild(renderTable(section, model));
    else if (section.svg) box.insertAdjacentHTML("beforeend", section.svg);
    else if (section.error) box.insertAdjacentHTML("beforeend", `<div class="aquin-chip aquin-warn">${escapeText(section.error)}</div>`);
    card.appendChild(box);
  }
  const tokens = document.createElement("div");
  tokens.className = "aquin-section aquin-token-panel";
  function drawTokens() {
    const view = model.get("token_view");
    const error = model.get("error");
    tokens.innerHTML = error
      ? `<div class="aquin-chip aquin-warn">${escapeText(error)}</div>`
      : view && view.prompts
        ? `<h4>Feature ${escapeText(view.feature)}: where it fires most</h4>${renderTokenView(view)}`
        : "";
  }
  model.on("change:token_view", drawTokens);
  model.on("change:error", drawTokens);
  drawTokens();
  card.appendChild(tokens);
  el.appendChild(card);
}

export default { render };
