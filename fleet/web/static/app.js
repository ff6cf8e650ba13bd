// edgeserve fleet dashboard: polls the JSON API and draws with uPlot (shipped, no CDN).
"use strict";

const REFRESH_MS = 3000;
const PALETTE = ["#4fb3ff", "#3fcf8e", "#f5b942", "#ff5d5d", "#b18cff", "#ff8fd1", "#7fe0e0"];
const charts = {};
let selectedModel = null;

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString();
}

// Draw (or update) a uPlot chart inside `id`. series: [{label, values}], xs: x values.
function drawChart(id, xs, series, opts = {}) {
  const target = document.getElementById(id);
  const width = Math.max(target.clientWidth, 300);
  const data = [xs, ...series.map((s) => s.values)];
  const key = series.map((s) => s.label).join("|") + (opts.bars ? "|bars" : "");
  const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null).length, 0);
  target.dataset.points = String(points);
  if (charts[id] && charts[id].key === key) {
    charts[id].plot.setData(data);
    return;
  }
  if (charts[id]) charts[id].plot.destroy();
  target.innerHTML = "";
  const n = xs.length;
  const config = {
    width, height: opts.height || 200,
    scales: {
      x: opts.bars ? { time: false, range: () => [-0.6, n - 0.4] }
        // a lone point would otherwise stretch the time axis over years
        : { time: true, range: (u, min, max) => (max - min < 60 ? [max - 60, max + 5] : [min, max]) },
    },
    axes: [
      { stroke: "#8b96a3", grid: { stroke: "#26303a" },
        splits: opts.bars ? () => xs : undefined,
        values: opts.bars ? (u, vals) => vals.map((v) => opts.labels[v] ?? "") : undefined },
      { stroke: "#8b96a3", grid: { stroke: "#26303a" } },
    ],
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || PALETTE[i % PALETTE.length], width: 2,
      dash: s.dash, fill: opts.bars ? (s.color || PALETTE[i % PALETTE.length]) + "88" : undefined,
      paths: opts.bars ? uPlot.paths.bars({ size: [0.35, 60], align: i % 2 ? 1 : -1 }) : undefined,
      points: { show: opts.bars ? false : true, size: 4 },
      spanGaps: true,
    }))],
  };
  charts[id] = { key, plot: new uPlot(config, data, target) };
}

function renderCards(o) {
  const online = (o.by_state && o.by_state.online) || 0;
  const offline = (o.by_state && o.by_state.offline) || 0;
  const cards = [["devices", o.devices], ["online", online], ["offline", offline],
    ["windows stored", o.windows_stored], ["windows dropped on devices", o.dropped_total]];
  const root = document.getElementById("cards");
  root.replaceChildren(...cards.map(([k, v]) =>
    el("div", { class: "card" }, el("div", { class: "v" }, fmt(v, 6)), el("div", { class: "k" }, k))));
}

function renderProfiles(o) {
  const names = Object.keys(o.by_profile).sort();
  const xs = names.map((_, i) => i);
  drawChart("chart-profiles", xs, [
    { label: "online", values: names.map((n) => (o.online_by_profile[n] || 0)), color: "#3fcf8e" },
    { label: "not online", values: names.map((n) => o.by_profile[n] - (o.online_by_profile[n] || 0)),
      color: "#ff5d5d" },
  ], { bars: true, labels: names });
}

function renderVersions(o) {
  const root = document.getElementById("versions");
  const rows = [];
  for (const [model, versions] of Object.entries(o.active_versions)) {
    const total = Object.values(versions).reduce((a, b) => a + b, 0);
    for (const [version, count] of Object.entries(versions).sort()) {
      rows.push(el("tr", {}, el("td", {}, model), el("td", {}, version), el("td", {}, count),
        el("td", { style: "width:40%" }, el("div", { class: "bar", style: `width:${(100 * count / total).toFixed(1)}%` }))));
    }
  }
  root.replaceChildren(rows.length ? el("table", {}, el("tr", {}, el("th", {}, "model"),
    el("th", {}, "version"), el("th", {}, "devices"), el("th", {}, "share")), ...rows)
    : el("p", { class: "muted" }, "no models deployed yet"));
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

function transferLine(t) {
  if (!t || !(t.full_transfers || t.delta_transfers)) return el("span");
  return el("div", { class: "muted transfer" },
    `sent ${fmtBytes(t.bytes_sent)}: ${t.delta_transfers} file(s) as deltas `
    + `(${fmtBytes(t.delta_bytes_sent)} instead of ${fmtBytes(t.delta_full_bytes)}), `
    + `${t.full_transfers} in full (${fmtBytes(t.full_bytes_sent)}); saved ${fmtBytes(t.saved)}`
    + (t.fallbacks ? `; ${t.fallbacks} delta(s) refused by devices and sent in full` : ""));
}

function renderRollouts(list) {
  const root = document.getElementById("rollouts");
  if (!list.length) { root.replaceChildren(el("p", { class: "muted" }, "no rollouts yet")); return; }
  const blocks = list.map((r) => {
    const stages = el("div", { class: "stages" }, ...r.stages.map((pct, i) => {
      const done = r.phase === "completed" || i < r.stage - 1;
      const current = i === r.stage - 1 && !done;
      const failed = (r.phase === "rolled-back" || r.phase === "rolling-back") && current;
      const width = done ? 100 : current ? 50 : 0;
      return el("div", { class: `stage ${done ? "done" : ""} ${failed ? "failed" : ""}`, title: `${pct}%` },
        el("i", { style: `width:${width}%` }));
    }));
    const gates = el("table", {}, el("tr", {}, el("th", {}, "gate"), el("th", {}, "verdict"),
      el("th", {}, "canary"), el("th", {}, "bound"), el("th", {}, "detail")),
      ...r.gates.map((g) => el("tr", {}, el("td", {}, g.gate),
        el("td", { class: `gate-${g.verdict}` }, g.verdict), el("td", {}, fmt(g.canary)),
        el("td", {}, fmt(g.bound)), el("td", { class: "muted" }, g.detail))));
    const chartId = `chart-rollout-${r.id.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const block = el("div", { class: "rollout" },
      el("div", {}, el("strong", {}, r.id), " ", el("span", { class: `badge ${r.phase}` }, r.phase),
        " ", el("span", { class: "muted" }, `${r.strategy} ${r.model} → ${r.version}, stage ${r.stage}/${r.stages.length}, ${r.devices} device(s)`)),
      r.reason ? el("div", { class: "gate-fail" }, r.reason) : el("span"),
      transferLine(r.transfer),
      stages, gates, el("h3", {}, "gate values over time (canary, dashed = bound)"),
      el("div", { id: chartId, class: "chart rollout-chart", "data-points": "0" }));
    return { block, chartId, r };
  });
  root.replaceChildren(...blocks.map((b) => b.block));
  for (const key of Object.keys(charts)) {
    if (key.startsWith("chart-rollout-")) { charts[key].plot.destroy(); delete charts[key]; }
  }
  blocks.forEach(({ chartId, r }) => loadRolloutChart(chartId, r.id));
}

async function loadRolloutChart(chartId, id) {
  const detail = await getJSON(`/api/v1/rollouts/${encodeURIComponent(id)}`);
  const events = detail.events.filter((e) => e.data && e.data.gates && e.data.gates.length);
  const xs = events.map((e) => e.ts);
  const names = events.length ? events[events.length - 1].data.gates.map((g) => g.gate) : [];
  const series = [];
  names.forEach((name, i) => {
    const color = PALETTE[i % PALETTE.length];
    const pick = (e, field) => { const g = e.data.gates.find((x) => x.gate === name); return g ? g[field] : null; };
    series.push({ label: `${name} canary`, values: events.map((e) => pick(e, "canary")), color });
    series.push({ label: `${name} bound`, values: events.map((e) => pick(e, "bound")), color, dash: [6, 4] });
  });
  if (series.length) drawChart(chartId, xs, series, { height: 180 });
}

async function renderModels() {
  const models = await getJSON("/api/v1/models");
  const select = document.getElementById("model-select");
  const names = models.map((m) => m.model).sort();
  if (!names.length) return;
  if (!selectedModel || !names.includes(selectedModel)) selectedModel = names[0];
  if ([...select.options].map((o) => o.value).join() !== names.join()) {
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  }
  select.value = selectedModel;
  const s = await getJSON(`/api/v1/models/${encodeURIComponent(selectedModel)}/series?bucket=10`);
  const versions = Object.keys(s.versions).sort();
  const times = [...new Set(versions.flatMap((v) => s.versions[v].map((p) => p.t)))].sort((a, b) => a - b);
  const lookup = (v, field) => {
    const byT = new Map(s.versions[v].map((p) => [p.t, p[field]]));
    return times.map((t) => (byT.has(t) ? byT.get(t) : null));
  };
  const latency = [];
  versions.forEach((v, i) => {
    const color = PALETTE[i % PALETTE.length];
    latency.push({ label: `${v} p50`, values: lookup(v, "p50_ms"), color, dash: [2, 3] });
    latency.push({ label: `${v} p95`, values: lookup(v, "p95_ms"), color });
    latency.push({ label: `${v} p99`, values: lookup(v, "p99_ms"), color, dash: [8, 3] });
  });
  drawChart("chart-latency", times, latency);
  drawChart("chart-errors", times, versions.map((v) => ({ label: v, values: lookup(v, "error_rate") })));
  drawChart("chart-drift", times, versions.map((v) => ({ label: v, values: lookup(v, "drift_psi") })));
  drawChart("chart-throughput", times, versions.map((v) => ({ label: v, values: lookup(v, "throughput") })));
}

function renderExperiments(list) {
  const panel = document.getElementById("experiments-panel");
  if (!list.length) { panel.hidden = true; return; }
  panel.hidden = false;
  const header = el("tr", {}, ...["arm", "samples", "estimate", "95% interval", "weight"]
    .map((h) => el("th", {}, h)));
  const armRow = (a) => {
    const weight = 100 * (a.weight || 0);
    return el("tr", {}, el("td", {}, a.version), el("td", {}, a.n), el("td", {}, fmt(a.mean)),
      el("td", {}, a.ci ? `${fmt(a.ci[0])} – ${fmt(a.ci[1])}` : "–"),
      el("td", { style: "width:30%" },
        el("div", { class: "bar", style: `width:${weight.toFixed(1)}%` }), ` ${fmt(weight, 3)}%`));
  };
  const blocks = list.map((x) => el("div", { class: "rollout" },
    el("div", {}, el("strong", {}, x.id), " ", el("span", { class: `badge ${x.state}` }, x.state),
      " ", el("span", { class: "muted" }, `${x.kind} on ${x.model}, metric ${x.metric}`)),
    x.result ? el("div", {}, x.result) : el("span"),
    el("table", {}, header.cloneNode(true), ...x.arms.map(armRow))));
  document.getElementById("experiments").replaceChildren(...blocks);
}

async function refresh() {
  try {
    const [overview, rollouts, experiments] = await Promise.all([
      getJSON("/api/v1/overview"), getJSON("/api/v1/rollouts?all=1"), getJSON("/api/v1/experiments")]);
    renderCards(overview);
    renderProfiles(overview);
    renderVersions(overview);
    renderRollouts(rollouts.slice(-6).reverse());
    renderExperiments(experiments);
    await renderModels();
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("updated").textContent = `update failed: ${err.message}`;
  }
}

document.getElementById("model-select").addEventListener("change", (e) => {
  selectedModel = e.target.value;
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
