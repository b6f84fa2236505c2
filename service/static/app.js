"use strict";
/* Manifold Guard's page. It calls only the public API — GET /v1/models, POST /v1/classify, POST /v1/attack — so
   every cap and check of the API applies. Nothing is stored: the API key is read from its field per request. */

const $ = (id) => document.getElementById(id);
const WARM = ["invert-classify", "enhanced-invert-classify"];
const state = { models: null, file: null, input: null, controller: null, timer: null, done: 0 };

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/* -- requests: one at a time, cancellable, errors as the API words them ---------------------------------- */
async function api(path, init, what) {
  const controller = new AbortController();
  state.controller = controller;
  const started = busy(what);
  try {
    const r = await fetch(path, { ...init, signal: controller.signal });
    const text = await r.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch { body = null; }
    if (!r.ok) {
      const words = body && typeof body.error === "string" ? body.error : text || r.statusText;
      throw new ApiError(r.status, words);
    }
    return body;
  } finally {
    state.controller = null;
    idle(`${what}: answered in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  }
}

function busy(what) {
  const started = performance.now();
  const tick = () => { $("busy-text").textContent = `${what}… ${((performance.now() - started) / 1000).toFixed(1)} s`; };
  tick();
  state.timer = setInterval(tick, 100);
  $("progress").hidden = false;
  $("cancel").hidden = false;
  $("error").hidden = true;
  document.body.dataset.busy = "true";
  buttons();
  return started;
}

function idle(text) {
  clearInterval(state.timer);
  $("busy-text").textContent = text;
  $("progress").hidden = true;
  $("cancel").hidden = true;
  document.body.dataset.busy = "false";
  buttons();
}

/* Run is enabled unless a request is in flight; Attack also needs an input the model has seen. */
function buttons() {
  const inFlight = state.controller !== null;
  $("run").disabled = inFlight;
  $("attack").disabled = inFlight || !state.input;
}

function finished() {
  state.done += 1;
  document.body.dataset.done = String(state.done);
}

function report(err) {
  if (err.name === "AbortError") {
    $("busy-text").textContent = "Cancelled.";
    return;
  }
  const box = $("error");
  box.textContent = err instanceof ApiError ? `HTTP ${err.status}: ${err.message}` : `Request failed: ${err.message}`;
  box.dataset.status = err instanceof ApiError ? String(err.status) : "";
  box.hidden = false;
}

async function run(task) {
  try {
    await task();
  } catch (err) {
    report(err);
  } finally {
    finished();
  }
}

/* -- models, defaults and caps --------------------------------------------------------------------------- */
function options(select, values, chosen, label = (v) => v) {
  select.replaceChildren(...values.map((v) => new Option(label(v), v, false, v === chosen)));
}

function dataset() {
  return state.models.datasets[$("dataset").value];
}

/* The dataset's image format (GET /v1/models: datasets[ds].spec): channels, height, width. */
function spec() {
  return dataset().spec;
}

/* The pad draws for 1-channel datasets (a light stroke on dark); a colour dataset takes an uploaded image. */
function drawable() {
  return spec().channels === 1;
}

function onDataset() {
  const d = dataset();
  $("pad").dataset.drawing = String(drawable());
  if (!state.file) clearPad();
  options($("classifier"), d.classifiers, d.default.classifier);
  options($("defense"), d.defenses, d.default.defense);
  const attackable = d.defenses.filter((x) => x === "defense-gan" || x === "invert-classify");
  options($("attack-defense"), attackable, attackable[0]);
  onDefense();
  if ($("method").options.length) onMethod(); // the attack panel is set up: its ε range follows the image size
  drawRobustness();
}

function onDefense() {
  const { defaults, caps } = state.models;
  const defense = $("defense").value;
  const warm = WARM.includes(defense);
  const steps = $("steps");
  const restarts = $("restarts");
  steps.min = warm ? 0 : 1;
  steps.max = caps.max_steps;
  restarts.max = caps.max_restarts;
  steps.value = warm ? defaults.encoder_steps : defaults.steps;
  restarts.value = warm ? defaults.encoder_restarts : defaults.restarts;
  steps.disabled = restarts.disabled = defense === "none";
  $("steps-cap").textContent = `(${steps.min}–${caps.max_steps})`;
  $("restarts-cap").textContent = `(1–${caps.max_restarts})`;
}

function pipelineParams() {
  const p = { model: `${$("dataset").value}/${$("classifier").value}`, defense: $("defense").value };
  if (p.defense !== "none") Object.assign(p, { steps: $("steps").value, restarts: $("restarts").value });
  if ($("seed").value !== "") p.seed = $("seed").value;
  return p;
}

/* -- the drawing pad and uploads ---------------------------------------------------------------------------- */
const pad = { ctx: null, last: null, pen: { x: 140, y: 140, down: false } };

function clearPad() {
  pad.ctx.fillStyle = "#000";
  pad.ctx.fillRect(0, 0, $("pad").width, $("pad").height);
  useDrawing();
}

function useDrawing() {
  state.file = null;
  $("file").value = "";
  $("source").textContent = !state.models || drawable()
    ? "Source: the drawing (light stroke on dark, MNIST's polarity)."
    : `Source: none yet. ${$("dataset").value} holds colour images: upload or drop one (the pad draws for 1-channel datasets).`;
}

function stroke(from, to) {
  const ctx = pad.ctx;
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

function padPoint(e) {
  const c = $("pad");
  const r = c.getBoundingClientRect();
  return { x: ((e.clientX - r.left) * c.width) / r.width, y: ((e.clientY - r.top) * c.height) / r.height };
}

function onPadKey(e) {
  const moves = { ArrowLeft: [-10, 0], ArrowRight: [10, 0], ArrowUp: [0, -10], ArrowDown: [0, 10] };
  const pen = pad.pen;
  if (e.key === "Delete" || e.key === "Backspace") clearPad();
  else if (!drawable()) return;
  else if (e.key === " ") {
    pen.down = !pen.down;
    if (pen.down) { if (state.file) useDrawing(); stroke(pen, pen); }
  } else if (moves[e.key]) {
    const to = { x: Math.min(279, Math.max(0, pen.x + moves[e.key][0])), y: Math.min(279, Math.max(0, pen.y + moves[e.key][1])) };
    if (pen.down) stroke(pen, to);
    Object.assign(pen, to);
  } else return;
  e.preventDefault();
}

function setupPad() {
  const c = $("pad");
  pad.ctx = c.getContext("2d");
  clearPad();
  c.addEventListener("pointerdown", (e) => {
    if (!drawable()) return;
    c.setPointerCapture(e.pointerId);
    if (state.file) clearPad();
    pad.last = padPoint(e);
    stroke(pad.last, pad.last);
  });
  c.addEventListener("pointermove", (e) => {
    if (!pad.last) return;
    const p = padPoint(e);
    stroke(pad.last, p);
    pad.last = p;
  });
  for (const ev of ["pointerup", "pointercancel"]) c.addEventListener(ev, () => { pad.last = null; });
  c.addEventListener("keydown", onPadKey);
  $("clear").addEventListener("click", clearPad);
  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
  $("file").addEventListener("change", () => { if ($("file").files[0]) useFile($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) useFile(e.dataTransfer.files[0]);
  });
}

async function useFile(file) {
  state.file = file;
  const ctx = pad.ctx;
  const c = $("pad");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, c.width, c.height);
  let note = "sent as uploaded; the server decodes and resizes it";
  try {
    const bmp = await createImageBitmap(file);
    const k = Math.min(c.width / bmp.width, c.height / bmp.height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(bmp, (c.width - bmp.width * k) / 2, (c.height - bmp.height * k) / 2, bmp.width * k, bmp.height * k);
  } catch {
    note = "the browser cannot preview it; sent as uploaded";
  }
  $("source").textContent = `Source: ${file.name} (${file.size} bytes), ${note}. Drawing starts a new image.`;
}

function sourceBlob() {
  if (state.file) return Promise.resolve([state.file, state.file.name]);
  if (!drawable()) throw new Error(`${$("dataset").value} takes colour images: upload or drop one first`);
  return new Promise((resolve) => $("pad").toBlob((b) => resolve([b, "drawing.png"]), "image/png"));
}

/* -- images as the model sees them ----------------------------------------------------------------------- */
const dataUrl = (b64) => `data:image/png;base64,${b64}`;

/* A PNG the API returned → its values in [0, 1], channel-major (C×H×W, as the API's arrays). */
async function pixels(b64) {
  const { channels, height, width } = spec();
  const img = new Image();
  img.src = dataUrl(b64);
  await img.decode();
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const plane = width * height;
  return Float32Array.from({ length: channels * plane }, (_, i) => rgba[4 * (i % plane) + Math.floor(i / plane)] / 255);
}

/* C×H×W values in [0, 1] → the canvas, gray or colour as the dataset's images are. */
function drawValues(canvas, values) {
  const { channels, height, width } = spec();
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(width, height);
  const plane = width * height;
  const at = (i, k) => Math.round(255 * Math.min(1, Math.max(0, values[(channels === 1 ? 0 : k) * plane + i])));
  for (let i = 0; i < plane; i += 1) img.data.set([at(i, 0), at(i, 1), at(i, 2), 255], 4 * i);
  ctx.putImageData(img, 0, 0);
}

/* -- classify -------------------------------------------------------------------------------------------- */
async function classify() {
  const [blob, name] = await sourceBlob();
  const form = new FormData();
  form.append("file", blob, name);
  for (const [k, v] of Object.entries(pipelineParams())) form.append(k, String(v));
  form.append("return_purified", "true");
  form.append("return_input", "true");
  const body = await api("/v1/classify", { method: "POST", body: form }, "Purifying and classifying");
  await showResult(body);
}

async function showResult(body) {
  const pred = body.predictions[0];
  const x = await pixels(pred.input_png);
  state.input = { png: pred.input_png, pixels: x };
  buttons();
  $("img-input").src = dataUrl(pred.input_png);
  const { channels, height, width } = spec();
  $("input-caption").textContent = `input x (${height}×${width}${channels === 3 ? ", colour" : ""})`;
  const purified = pred.purified_png !== null;
  $("fig-purified").hidden = $("fig-diff").hidden = !purified;
  if (purified) {
    $("img-purified").src = dataUrl(pred.purified_png);
    const g = await pixels(pred.purified_png);
    drawValues($("img-diff"), x.map((v, i) => Math.abs(v - g[i])));
  }
  const p = $("prediction");
  const how = body.defense === "none" ? "no defense" : `${body.defense}, L=${body.steps}, R=${body.restarts}`;
  p.textContent = `Prediction: ${pred.class_name} (label ${pred.label}, p = ${pred.probabilities[pred.label].toFixed(3)}) — ${body.model}, ${how}`;
  p.dataset.label = String(pred.label);
  drawProbabilities(pred);
  drawDetector(pred, body.threshold);
  drawTimings(body.timings_ms);
  $("result").hidden = false;
}

function drawProbabilities(pred) {
  const names = dataset().classes;
  const rows = pred.probabilities.flatMap((v, i) => {
    const name = document.createElement("span");
    name.textContent = names[i] ?? String(i);
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * v).toFixed(2)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "num";
    value.textContent = v.toFixed(4);
    const row = [name, track, value];
    for (const el of row) if (i === pred.label) el.classList.add("top");
    track.dataset.prob = String(v);
    track.setAttribute("role", "img");
    track.setAttribute("aria-label", `${names[i] ?? i}: probability ${v.toFixed(4)}`);
    return row;
  });
  $("probs").replaceChildren(...rows);
}

function drawDetector(pred, threshold) {
  const box = $("detector");
  if (pred.mse === null) {
    box.textContent = "No projection (defense none): no reconstruction error to score.";
    return;
  }
  const text = document.createElement("p");
  const verdict = pred.flagged === null ? "no threshold is calibrated" : pred.flagged ? "FLAGGED as adversarial" : "not flagged";
  const cmp = threshold === null ? "" : ` ${pred.mse > threshold ? ">" : "≤"} threshold ${threshold.toPrecision(3)}`;
  text.textContent = `Reconstruction MSE ${pred.mse.toPrecision(3)}${cmp}: `;
  const v = document.createElement("span");
  v.className = pred.flagged ? "flag-yes" : "flag-no";
  v.textContent = verdict;
  text.append(v);
  const gauge = document.createElement("div");
  gauge.className = "gauge";
  gauge.setAttribute("role", "img");
  gauge.setAttribute("aria-label", `MSE ${pred.mse.toPrecision(3)} against threshold ${threshold ?? "none"}`);
  const top = 1.25 * Math.max(pred.mse, threshold ?? 0) || 1;
  const fill = document.createElement("div");
  fill.className = `gauge-fill${pred.flagged ? " flagged" : ""}`;
  fill.style.width = `${(100 * pred.mse) / top}%`;
  gauge.append(fill);
  if (threshold !== null) {
    const mark = document.createElement("div");
    mark.className = "gauge-mark";
    mark.style.left = `${(100 * threshold) / top}%`;
    gauge.append(mark);
  }
  box.replaceChildren(text, gauge);
}

function drawTimings(timings) {
  const rows = Object.entries(timings).map(([k, v]) => {
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    name.textContent = k.replace(/_ms$/, "");
    const ms = document.createElement("td");
    ms.className = "num";
    ms.textContent = v.toFixed(1);
    tr.append(name, ms);
    return tr;
  });
  $("timings").tBodies[0].replaceChildren(...rows);
}

/* -- attack ---------------------------------------------------------------------------------------------- */
function setupAttack() {
  const info = state.models.attack;
  if (!info || !info.enabled) return;
  const methods = Object.entries(info.methods).filter(([, m]) => m.params.includes("eps"));
  const label = (name) => { const m = info.methods[name]; return `${name} (${m.norm}${m.target === "defended" ? ", adaptive" : ""})`; };
  options($("method"), methods.map(([name]) => name), "fgsm", label);
  $("method").addEventListener("change", onMethod);
  onMethod();
  $("attack-panel").hidden = false;
}

function onMethod() {
  const m = state.models.attack.methods[$("method").value];
  const { channels, height, width } = spec();
  const l2max = Math.sqrt(channels * height * width).toFixed(1);
  $("eps").value = m.defaults.eps;
  $("eps").max = m.norm === "linf" ? 1 : l2max;
  $("eps-norm").textContent = m.norm === "linf" ? "(L∞, 0–1)" : `(L2, 0–${l2max})`;
  const adaptive = m.target === "defended";
  $("target").options[0].disabled = adaptive;
  if (adaptive) $("target").value = "defended";
}

async function attack() {
  const p = pipelineParams();
  const body = { image: state.input.png, method: $("method").value, params: { eps: Number($("eps").value) },
                 target: $("target").value, model: p.model, seed: p.seed === undefined ? undefined : Number(p.seed) };
  if ($("attack-defense").value) body.defense = $("attack-defense").value;
  if (p.steps !== undefined) Object.assign(body, { steps: Number(p.steps), restarts: Number(p.restarts) });
  const init = { method: "POST", body: JSON.stringify(body),
                 headers: { "Content-Type": "application/json", "X-API-Key": $("api-key").value } };
  showAttack(await api("/v1/attack", init, "Attacking"));
}

function predictionText(pred, withDetector) {
  if (!pred) return "—";
  const names = dataset().classes;
  let text = `${names[pred.label] ?? pred.label} (${pred.label}), p = ${pred.probabilities[pred.label].toFixed(3)}`;
  if (withDetector && pred.mse !== null) {
    text += `; MSE ${pred.mse.toPrecision(3)}${pred.flagged === null ? "" : pred.flagged ? ", flagged" : ", not flagged"}`;
  }
  return text;
}

function showAttack(res) {
  $("img-adv").src = dataUrl(res.adversarial.png_base64);
  const x = state.input.pixels;
  const delta = res.adversarial.array.flat(2).map((v, i) => v - x[i]);
  const scale = Math.max(...delta.map(Math.abs)) || 1;
  drawValues($("img-pert"), delta.map((d) => 0.5 + d / (2 * scale)));
  $("pert-caption").textContent = `perturbation ×${(0.5 / scale).toFixed(1)} (gray = 0); L∞ ${res.adversarial.linf.toFixed(3)}, L2 ${res.adversarial.l2.toFixed(3)}`;
  const rows = [["before attack", res.before], ["after attack", res.after]].map(([name, r]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name;
    const cells = [predictionText(r.classifier, false), predictionText(r.defended, true)].map((t, i) => {
      const td = document.createElement("td");
      td.textContent = t;
      const pred = i === 0 ? r.classifier : r.defended;
      if (pred) td.dataset.label = String(pred.label);
      return td;
    });
    tr.append(th, ...cells);
    return tr;
  });
  $("attack-table").tBodies[0].replaceChildren(...rows);
  $("attack-verdict").textContent = attackVerdict(res);
  $("attack-result").hidden = false;
}

function attackVerdict(res) {
  const fooled = (v) => (v === null ? "not run" : v ? "fooled" : "not fooled");
  const parts = [`${res.method} (${res.threat_model}, target ${res.target}): the bare classifier is ${fooled(res.fooled.classifier)}`];
  if (res.fooled.defended !== null) parts.push(`the defended pipeline is ${fooled(res.fooled.defended)}`);
  if (res.after.defended) {
    const flag = res.after.defended.flagged;
    parts.push(flag === null ? "the detector has no threshold calibrated for this projection"
      : flag ? "the detector flags the adversarial image" : "the detector does not flag it");
  }
  return `${parts.join("; ")}.`;
}

/* -- measured robustness (GET /v1/models: datasets[ds].measured) ------------------------------------------- */
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function measuredRows() {
  const d = dataset();
  const byThreat = {};
  for (const [clf, m] of Object.entries(d.measured || {})) {
    for (const [defense, cells] of Object.entries(m.robustness || {})) {
      for (const [threat, cell] of Object.entries(cells)) {
        if (!cell || typeof cell.accuracy !== "number") continue;
        const isDefault = clf === d.default.classifier && defense === d.default.defense;
        (byThreat[threat] ||= []).push({ name: `${clf} + ${defense}`, isDefault, ...cell });
      }
    }
  }
  return byThreat;
}

function threatTitle(threat) {
  if (threat === "clean") return "clean images (no attack)";
  const parts = threat.split("+").map((t) => {
    const [norm, eps] = t.split(":");
    return `${norm === "linf" ? "L∞" : norm.toUpperCase()} attacks, ε = ${eps}`;
  });
  // a union ("linf:0.3+l2:2"): an image counts only if every attack of every norm failed on it
  return parts.length > 1 ? `${parts.join(" and ")}, both at once` : parts[0];
}

function plot(threat, rows) {
  const W = 1000, left = 400, right = 230, rowH = 20, top = 24;
  const H = top + rows.length * rowH + 10;
  const x = (v) => left + v * (W - left - right);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": `accuracy, ${threatTitle(threat)}` });
  root.dataset.threat = threat;
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    root.append(svg("line", { x1: x(t), x2: x(t), y1: top - 4, y2: H - 6, stroke: "#c8ccd2" }));
    root.append(svg("text", { x: x(t), y: top - 8, "text-anchor": "middle" }, t.toFixed(2)));
  }
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    const g = svg("g", { "data-pipeline": r.name, "data-accuracy": r.accuracy });
    g.append(svg("title", {}, `${r.name}: ${r.accuracy} [${r.ci}] n=${r.n}${r.attacks ? `; ${r.attacks.join(", ")}` : ""}`));
    g.append(svg("text", { x: left - 6, y: y + 14, "text-anchor": "end", "font-weight": r.isDefault ? 700 : 400 },
                 `${r.name}${r.isDefault ? " (served by default)" : ""}`));
    g.append(svg("rect", { x: left, y: y + 3, width: Math.max(0.5, x(r.accuracy) - left), height: rowH - 6,
                           fill: r.isDefault ? "#7a4f00" : "#0b5cad" }));
    if (r.ci) g.append(svg("line", { x1: x(r.ci[0]), x2: x(r.ci[1]), y1: y + rowH / 2, y2: y + rowH / 2, stroke: "#1a1a1a", "stroke-width": 2 }));
    const ci = r.ci ? ` [${r.ci[0].toFixed(3)}, ${r.ci[1].toFixed(3)}]` : "";
    g.append(svg("text", { x: W - right + 6, y: y + 14 }, `${r.accuracy.toFixed(3)}${ci} n=${r.n}`));
    root.append(g);
  });
  const fig = document.createElement("figure");
  fig.className = "plot";
  const cap = document.createElement("figcaption");
  cap.textContent = `Accuracy, ${threatTitle(threat)}`;
  fig.append(cap, root);
  return fig;
}

function drawRobustness() {
  const byThreat = measuredRows();
  const threats = Object.keys(byThreat).sort((a, b) => (a === "clean" ? -1 : b === "clean" ? 1 : a.localeCompare(b)));
  const box = $("robust-plots");
  if (!threats.length) {
    box.textContent = `No measured robustness is recorded for ${$("dataset").value}.`;
    return;
  }
  box.replaceChildren(...threats.map((t) => plot(t, byThreat[t])));
}

/* -- start ----------------------------------------------------------------------------------------------- */
async function start() {
  setupPad();
  $("cancel").addEventListener("click", () => state.controller && state.controller.abort());
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) state.controller.abort(); });
  $("run-form").addEventListener("submit", (e) => { e.preventDefault(); run(classify); });
  $("attack-form").addEventListener("submit", (e) => { e.preventDefault(); run(attack); });
  $("dataset").addEventListener("change", onDataset);
  $("defense").addEventListener("change", onDefense);
  await run(async () => {
    state.models = await api("/v1/models", {}, "Loading the models");
    const names = Object.keys(state.models.datasets);
    options($("dataset"), names, state.models.defaults.model.split("/")[0]);
    onDataset();
    setupAttack();
    document.body.dataset.ready = "true";
  });
}

document.addEventListener("DOMContentLoaded", start);
