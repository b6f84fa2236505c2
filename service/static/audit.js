"use strict";
/* The page's Audit view. It calls only the audit API — GET /v1/audits/targets, POST /v1/audits, GET /v1/audits/{id}
   (polled: progress, partial results, the report), POST /v1/audits/{id}/cancel, GET /v1/audits/{id}/files/{plot}.
   The API key is read from its field per request and stored nowhere. `#audit-panel[data-status]` says where the
   audit is (idle, queued, running, done, failed, cancelled). */
(() => {
  const $ = (id) => document.getElementById(id);
  const NAMES = { linf: "L∞", l2: "L2" };
  const FINAL = ["done", "failed", "cancelled"];
  const audit = { id: null, timer: null };

  async function call(path, init = {}) {
    const headers = { "X-API-Key": $("audit-key").value, ...(init.headers || {}) };
    const r = await fetch(path, { ...init, headers });
    if (!r.ok) {
      const text = await r.text();
      let words = text || r.statusText;
      try { words = JSON.parse(text).error || words; } catch { /* not JSON: the text itself */ }
      throw new Error(`${r.status}: ${words}`);
    }
    return r;
  }

  function fail(err) {
    $("audit-error").textContent = `Audit: ${err.message}`;
    $("audit-error").hidden = false;
  }

  function status(value) {
    $("audit-panel").dataset.status = value;
    const live = value === "queued" || value === "running";
    $("audit-start").disabled = live || !$("audit-target").value;
    $("audit-cancel").hidden = !live;
  }

  function option(select, values) {
    select.replaceChildren(...values.map((v) => { const o = document.createElement("option"); o.textContent = v; return o; }));
  }

  async function loadTargets() {
    $("audit-error").hidden = true;
    try {
      const body = await (await call("/v1/audits/targets")).json();
      option($("audit-target"), body.targets);
      option($("audit-sample"), body.samples.filter((s) => s !== "upload"));
      status($("audit-panel").dataset.status);
    } catch (err) { fail(err); }
  }

  function request() {
    const num = (id) => Number($(id).value);
    const threats = [["linf", "audit-linf"], ["l2", "audit-l2"]].filter(([, id]) => $(id).value !== "")
      .map(([norm, id]) => ({ norm, eps: [num(id)] }));
    return {
      target: $("audit-target").value, sample: $("audit-sample").value, n: num("audit-n"),
      queries: num("audit-queries"), hsj_queries: num("audit-queries"), seeds: num("audit-seeds"),
      rounds: num("audit-rounds"), threats, timing_images: 4,
      pipelines: [{ defense: $("audit-defense").value, steps: num("audit-steps"), restarts: num("audit-restarts") }],
    };
  }

  async function startAudit(e) {
    e.preventDefault();
    $("audit-error").hidden = true;
    $("audit-report").hidden = true;
    $("audit-partial").hidden = true;
    try {
      const r = await call("/v1/audits", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(request()) });
      audit.id = (await r.json()).id;
      $("audit-panel").dataset.audit = audit.id;
      status("queued");
      $("audit-busy").hidden = false;
      clearInterval(audit.timer);
      audit.timer = setInterval(poll, 500);
      poll();
    } catch (err) { fail(err); }
  }

  async function poll() {
    if (!audit.id) return;
    let view;
    try { view = await (await call(`/v1/audits/${audit.id}`)).json(); } catch (err) { fail(err); return; }
    const p = view.progress;
    $("audit-progress").max = p.total;
    $("audit-progress").value = p.done;
    $("audit-step").textContent = `${view.status}: ${p.done}/${p.total} — ${p.step}`;
    drawPartial(view.partial);
    if (!FINAL.includes(view.status)) { status(view.status); return; }
    clearInterval(audit.timer);
    status(view.status);
    if (view.status === "done") await drawReport(view.report);
    else if (view.error) fail(new Error(`${view.status}: ${view.error}`));
  }

  const ci = (s) => `${s.accuracy.toFixed(3)} [${s.ci[0].toFixed(3)}, ${s.ci[1].toFixed(3)}] (n=${s.n})`;

  function row(cells, tag = "td") {
    const tr = document.createElement("tr");
    for (const c of cells) { const td = document.createElement(tag); td.textContent = c; tr.append(td); }
    return tr;
  }

  function drawPartial(rows) {
    $("audit-partial").hidden = !rows.length;
    $("audit-partial").tBodies[0].replaceChildren(
      ...rows.map((r) => row([r.variant, `${NAMES[r.norm]} ${r.eps}`, r.attack, ci(r)])));
  }

  function table(id, caption, head, rows) {
    const t = document.createElement("table");
    t.id = id;
    t.createCaption().textContent = caption;
    t.createTHead().append(row(head, "th"));
    const body = t.createTBody();
    body.append(...rows.map((r) => row(r)));
    return t;
  }

  async function plot(name) {
    const img = document.createElement("img");
    img.alt = `audit plot ${name}`;
    img.src = URL.createObjectURL(await (await call(`/v1/audits/${audit.id}/files/${name}`)).blob());
    return img;
  }

  async function drawReport(rep) {
    const box = $("audit-report");
    const worst = table("audit-worst", "Robust accuracy (every attack, per image)",
      ["threat", "variant", "clean", "robust [95% CI] (n)", "worst attack"],
      rep.worst.map((w) => [`${NAMES[w.norm]} ${w.eps}`, w.variant, ci(rep.clean[w.variant]), ci(w), w.worst_attack]));
    const gain = table("audit-gain", "The guard's gain (on the images both attacked)",
      ["pipeline", "threat", "n", "bare", "guarded", "gain"],
      rep.gain.map((g) => [g.pipeline, `${NAMES[g.norm]} ${g.eps}`, g.n, g.bare.toFixed(3), g.guarded.toFixed(3),
                           (g.gain >= 0 ? "+" : "") + g.gain.toFixed(3)]));
    const cost = table("audit-cost", "The guard's cost", ["pipeline", "latency ms (bare)", "images/s (bare)"],
      rep.cost.map((c) => [c.pipeline, `${c.latency_ms.toFixed(1)} (${c.bare_latency_ms.toFixed(1)})`,
                           `${c.images_per_s} (${c.bare_images_per_s})`]));
    const skipped = document.createElement("ul");
    skipped.id = "audit-not-run";
    skipped.append(...rep.not_run.map((x) => { const li = document.createElement("li"); li.textContent = `${x.what}: ${x.why}`; return li; }));
    const title = document.createElement("h3");
    title.textContent = "Not run, and why";
    const plots = await Promise.all((rep.files || []).filter((f) => f.endsWith(".svg")).map(plot));
    const link = document.createElement("p");
    link.className = "hint";
    link.textContent = `The whole report: GET /v1/audits/${audit.id}/files/report.md (or report.json).`;
    box.replaceChildren(worst, gain, cost, title, skipped, ...plots, link);
    box.hidden = false;
  }

  async function cancelAudit() {
    if (!audit.id) return;
    try { await call(`/v1/audits/${audit.id}/cancel`, { method: "POST" }); await poll(); } catch (err) { fail(err); }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("audit-load").addEventListener("click", loadTargets);
    $("audit-form").addEventListener("submit", startAudit);
    $("audit-cancel").addEventListener("click", cancelAudit);
    $("audit-target").addEventListener("change", () => status($("audit-panel").dataset.status));
  });
})();
