// Sovereign console: forms that call the admin API, and usage charts drawn as SVG.
// Plain JavaScript, no dependencies, no build step.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const status = document.getElementById("status");
  const say = (text, isError) => { status.textContent = text; status.className = isError ? "status error" : "status"; };

  async function call(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const resp = await fetch(path, init);
    const data = (resp.headers.get("Content-Type") || "").includes("json") ? await resp.json() : {};
    if (!resp.ok) throw new Error((data.error && data.error.message) || ("HTTP " + resp.status));
    return data;
  }

  // Named inputs become JSON: numbers typed, "a.b" nested, empty fields left out
  // (or sent as null with data-null, which clears a limit on PATCH).
  function formBody(form) {
    const body = {};
    const nulls = new Set();
    for (const el of form.elements) {
      if (!el.name) continue;
      const path = el.name.split(".");
      if (el.value === "") { if (el.hasAttribute("data-null")) nulls.add(el.getAttribute("data-null") || el.name); continue; }
      let node = body;
      for (const part of path.slice(0, -1)) node = node[part] = node[part] || {};
      node[path[path.length - 1]] = el.type === "number" ? Number(el.value) : el.value;
    }
    // A budget period without credits is no budget.
    if (body.budget && body.budget.credits === undefined) delete body.budget;
    for (const name of nulls) if (body[name] === undefined) body[name] = null;
    return body;
  }

  async function run(el, body) {
    const [method, path] = el.getAttribute("data-api").split(" ");
    const confirmText = el.getAttribute("data-confirm");
    if (confirmText && !window.confirm(confirmText)) return;
    say("Working…");
    try {
      const data = await call(method, path, body);
      const then = el.getAttribute("data-then");
      if (then === "show-key") {
        document.getElementById("new-key-value").textContent = data.key;
        const box = document.getElementById("new-key");
        box.hidden = false; box.querySelector("button").focus();
        el.reset(); say("Key created.");
      } else if (then === "open-tenant") {
        window.location.assign("/console/tenants/" + encodeURIComponent(data.id));
      } else {
        window.location.reload();
      }
    } catch (err) { say(err.message, true); }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.hasAttribute("data-api")) { event.preventDefault(); run(form, formBody(form)); }
  });
  document.addEventListener("click", (event) => {
    const el = event.target.closest("button[data-api]");
    if (el && !el.form) run(el);
    if (event.target.closest("button[data-reload]")) window.location.reload();
  });

  // -- charts ------------------------------------------------------------
  const COLORS = ["#0a5bd3", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#a07800", "#495057"];
  const NS = "http://www.w3.org/2000/svg";
  const el = (name, attrs, text) => {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const fmt = (n) => n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e4 ? (n / 1e3).toFixed(0) + "k" : String(n);
  const label = (t, hourly) => {
    const d = new Date(t * 1000).toISOString();
    return hourly ? d.slice(5, 10) + " " + d.slice(11, 13) + "h" : d.slice(5, 10);
  };

  // Stacked bars: one bar per time bucket, one colour per series.
  function drawChart(box, rows, metric, split, hourly, range) {
    box.textContent = "";
    const value = (r) => metric === "tokens" ? r.input_tokens + r.output_tokens : r.credits;
    const times = [];  // every bucket of the range, empty ones too, so the time axis is even
    for (let t = range[0]; t < range[1]; t += hourly ? 3600 : 86400) times.push(t);
    const series = [...new Set(rows.map((r) => r[split]))].sort();
    if (!rows.length) { const p = document.createElement("p"); p.className = "empty"; p.textContent = "No usage in this range."; box.append(p); return; }
    const totals = times.map((t) => rows.filter((r) => r.start === t).reduce((s, r) => s + value(r), 0));
    const max = Math.max(1, ...totals);
    const W = 760, H = 200, L = 48, B = 26, T = 8, plotW = W - L - 8, plotH = H - B - T;
    const total = totals.reduce((a, b) => a + b, 0);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${metric} per ${hourly ? "hour" : "day"} by ${split}: ${total} in total`, "data-total": total });
    for (const f of [0, 0.5, 1]) {
      const y = T + plotH * (1 - f);
      svg.append(el("line", { x1: L, x2: W - 8, y1: y, y2: y, stroke: "#d0d7de" }));
      svg.append(el("text", { x: L - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#57606a" }, fmt(Math.round(max * f))));
    }
    const slot = plotW / times.length, bw = Math.min(48, Math.max(2, slot * 0.7));
    const step = Math.ceil(times.length / 8);
    times.forEach((t, i) => {
      let y = T + plotH;
      const x = L + i * slot + (slot - bw) / 2;
      series.forEach((s, si) => {
        const v = rows.filter((r) => r.start === t && r[split] === s).reduce((a, r) => a + value(r), 0);
        if (!v) return;
        const h = (v / max) * plotH;
        y -= h;
        const rect = el("rect", { x, y, width: bw, height: Math.max(h, 0.5), fill: COLORS[si % COLORS.length] });
        rect.append(el("title", {}, `${label(t, hourly)} · ${s}: ${v}`));
        svg.append(rect);
      });
      if (i % step === 0) svg.append(el("text", { x: x + bw / 2, y: H - 8, "text-anchor": "middle", "font-size": 11, fill: "#57606a" }, label(t, hourly)));
    });
    box.append(svg);
    const legend = document.createElement("ul");
    legend.className = "legend";
    series.forEach((s, si) => {
      const li = document.createElement("li");
      const swatch = document.createElement("i");
      swatch.style.background = COLORS[si % COLORS.length];
      li.append(swatch, String(s));
      legend.append(li);
    });
    box.append(legend);
  }

  function drawTable(box, rows, split) {
    const table = document.createElement("table");
    table.innerHTML = `<thead><tr><th scope="col">From</th><th scope="col">${split}</th><th scope="col">Requests</th><th scope="col">Input tokens</th><th scope="col">Output tokens</th><th scope="col">Credits</th></tr></thead>`;
    const body = document.createElement("tbody");
    for (const r of rows) {
      const tr = document.createElement("tr");
      for (const v of [new Date(r.start * 1000).toISOString().slice(0, 16).replace("T", " "), r[split], r.requests, r.input_tokens, r.output_tokens, r.credits]) {
        const td = document.createElement("td"); td.textContent = v; tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    box.textContent = ""; box.append(table);
  }

  async function loadUsage(section) {
    const form = section.querySelector("form");
    const start = form.start.value, endDay = form.end.value, split = form.split.value;
    const end = new Date(Date.parse(endDay + "T00:00:00Z") + 86400000).toISOString().slice(0, 10);
    const range = [Date.parse(start + "T00:00:00Z") / 1000, Date.parse(end + "T00:00:00Z") / 1000];
    const days = (Date.parse(end) - Date.parse(start)) / 86400000;
    const hourly = days <= 3;
    const base = section.getAttribute("data-usage-url");
    const url = base + (base.includes("?") ? "&" : "?") + new URLSearchParams({ start, end, group_by: (hourly ? "hour," : "day,") + split });
    try {
      const data = await call("GET", url);
      const field = split === "key" ? "key_id" : "model";
      for (const box of section.querySelectorAll(".chart")) drawChart(box, data.data, box.getAttribute("data-metric"), field, hourly, range);
      drawTable(section.querySelector(".usage-table"), data.data, field);
      section.setAttribute("data-loaded", String(Date.now()));
    } catch (err) { say(err.message, true); }
  }

  for (const section of document.querySelectorAll("[data-usage-url]")) {
    section.querySelector("form").addEventListener("submit", (event) => { event.preventDefault(); loadUsage(section); });
    loadUsage(section);
  }
})();
