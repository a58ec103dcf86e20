// loraplex console: polls /admin/console with the admin key kept in sessionStorage and draws
// live per-adapter charts on canvas (no library, no build step).
"use strict";
const KEY = "loraplex-admin-key";
const POLL_MS = 2000;
const POINTS = 90; // 3 minutes of history at one point per poll
const COLORS = ["#0366d6", "#d73a49", "#28a745", "#6f42c1", "#e36209", "#17a2b8", "#6a737d"];
const history = new Map(); // adapter -> [{rate, p50, p99}]
let timer = null;

const $ = (id) => document.getElementById(id);
const el = (tag, text, cls) => {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
};
const seconds = (v) => (v === null || v === undefined ? "-" : v < 1 ? `${(v * 1000).toFixed(0)} ms` : `${v.toFixed(2)} s`);

function showLogin(message) {
  clearInterval(timer);
  timer = null;
  $("console").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function poll() {
  const key = sessionStorage.getItem(KEY);
  if (!key) return showLogin("");
  let response;
  try {
    response = await fetch("/admin/console", { headers: { Authorization: `Bearer ${key}` } });
  } catch (err) {
    $("status").textContent = `server unreachable (${err})`;
    return;
  }
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem(KEY);
    const body = await response.json().catch(() => ({}));
    return showLogin((body.error && body.error.message) || `refused (${response.status})`);
  }
  if (!response.ok) {
    $("status").textContent = `console data: HTTP ${response.status}`;
    return;
  }
  render(await response.json());
}

function render(data) {
  $("login").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = false;
  $("model").textContent = `base model ${data.model}`;
  $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  for (const [adapter, stats] of Object.entries(data.live)) {
    if (!history.has(adapter)) history.set(adapter, []);
  }
  for (const [adapter, points] of history) {
    points.push(data.live[adapter] || { rate: 0, p50: null, p99: null });
    if (points.length > POINTS) points.shift();
  }
  renderAdapters(data);
  renderUsage(data.usage);
  renderErrors(data.errors);
  drawCharts();
}

function renderAdapters(data) {
  const body = $("adapters").tBodies[0];
  body.replaceChildren();
  for (const a of data.adapters) {
    const row = body.insertRow();
    row.dataset.adapter = a.name;
    row.append(el("td", a.name));
    const aliases = el("td");
    for (const [alias, version] of Object.entries(a.aliases)) aliases.append(el("span", `${alias} → ${version}`, "tag"));
    row.append(aliases);
    const versions = el("td");
    for (const [version, where] of Object.entries(a.residency)) versions.append(el("span", `${version}: ${where}`, `tag ${where}`));
    if (a.error) versions.append(el("div", a.error, "error"));
    row.append(versions);
    const evals = el("td");
    for (const e of a.evals) {
      const verdict = e.passed === true ? "pass" : e.passed === false ? "fail" : "-";
      evals.append(el("span", `${e.version} ${e.suite}: ${verdict}`, `tag ${verdict}`));
    }
    if (!a.evals.length) evals.append(el("span", "none", "muted"));
    row.append(evals);
    const live = Object.entries(data.live).filter(([label]) => a.versions.includes(label));
    const rate = live.reduce((sum, [, s]) => sum + s.rate, 0);
    const p50 = Math.max(...live.map(([, s]) => s.p50 ?? -1));
    const p99 = Math.max(...live.map(([, s]) => s.p99 ?? -1));
    row.append(el("td", rate.toFixed(2), "num"), el("td", p50 >= 0 ? seconds(p50) : "-", "num"), el("td", p99 >= 0 ? seconds(p99) : "-", "num"));
  }
}

function renderUsage(rows) {
  const body = $("usage").tBodies[0];
  body.replaceChildren();
  if (!rows.length) body.insertRow().append(el("td", "no usage recorded yet", "muted"));
  for (const u of rows) {
    const row = body.insertRow();
    row.append(el("td", u.tenant), el("td", u.adapter), el("td", u.requests, "num"), el("td", u.prompt_tokens, "num"), el("td", u.completion_tokens, "num"));
  }
}

function renderErrors(rows) {
  const body = $("errors").tBodies[0];
  body.replaceChildren();
  if (!rows.length) body.insertRow().append(el("td", "none", "muted"));
  for (const e of rows.slice(0, 20)) {
    const row = body.insertRow();
    row.append(el("td", new Date(e.time * 1000).toLocaleTimeString()), el("td", e.status), el("td", e.tenant || "-"), el("td", e.model || e.path), el("td", e.error || "", "error"));
  }
}

function drawCharts() {
  const series = [...history.entries()];
  const color = (i) => COLORS[i % COLORS.length];
  const rate = $("rate-chart");
  const latency = $("latency-chart");
  const rateLines = series.map(([, p], i) => ({ color: color(i), values: p.map((x) => x.rate) }));
  const latencyLines = series.flatMap(([, p], i) => [
    { color: color(i), values: p.map((x) => x.p99) },
    { color: color(i), values: p.map((x) => x.p50), dashed: true },
  ]);
  draw(rate, rateLines, tick);
  draw(latency, latencyLines, tick);
  const points = rateLines.reduce((n, l) => n + l.values.filter((v) => v > 0).length, 0);
  rate.dataset.points = String(points);
  latency.dataset.points = String(latencyLines.reduce((n, l) => n + l.values.filter((v) => v !== null).length, 0));
  const legend = $("legend");
  legend.replaceChildren();
  series.forEach(([adapter], i) => {
    const item = el("span", adapter);
    const swatch = el("i");
    swatch.style.background = color(i);
    item.prepend(swatch);
    legend.append(item);
  });
}

function tick(v) {
  if (v === 0) return "0";
  return v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toPrecision(2);
}

function draw(canvas, lines, label) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 44, right: 8, top: 8, bottom: 18 };
  ctx.clearRect(0, 0, width, height);
  const all = lines.flatMap((l) => l.values).filter((v) => v !== null);
  const max = Math.max(0.001, ...all) * 1.1;
  const x = (i) => pad.left + ((width - pad.left - pad.right) * i) / (POINTS - 1);
  const y = (v) => height - pad.bottom - ((height - pad.top - pad.bottom) * v) / max;
  ctx.strokeStyle = "#e1e4e8";
  ctx.fillStyle = "#6a737d";
  ctx.font = "11px system-ui";
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.left, y(v));
    ctx.lineTo(width - pad.right, y(v));
    ctx.stroke();
    ctx.fillText(label(v), 4, y(v) + 4);
  }
  ctx.fillText(`${(POINTS * POLL_MS) / 1000} s ago`, pad.left, height - 4);
  ctx.fillText("now", width - pad.right - 22, height - 4);
  for (const line of lines) {
    const offset = POINTS - line.values.length;
    ctx.strokeStyle = line.color;
    ctx.lineWidth = 2;
    ctx.setLineDash(line.dashed ? [5, 4] : []);
    ctx.beginPath();
    let drawing = false;
    line.values.forEach((v, i) => {
      if (v === null) { drawing = false; return; }
      if (drawing) ctx.lineTo(x(i + offset), y(v));
      else ctx.moveTo(x(i + offset), y(v));
      drawing = true;
    });
    ctx.stroke();
    ctx.fillStyle = line.color;
    line.values.forEach((v, i) => {
      if (v === null) return;
      ctx.beginPath();
      ctx.arc(x(i + offset), y(v), line.dashed ? 2 : 3, 0, 2 * Math.PI);
      ctx.fill();
    });
  }
  ctx.setLineDash([]);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  start();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  showLogin("");
});

function start() {
  clearInterval(timer);
  poll();
  timer = setInterval(poll, POLL_MS);
}

if (sessionStorage.getItem(KEY)) start();
else showLogin("");
