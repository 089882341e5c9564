// Shared by the three pages: fetching, small DOM helpers, the live feed, charts (uPlot, served by
// fleetd from /static/vendor). No framework: each page renders from its JSON and re-renders when the
// live feed says that what it shows changed.
"use strict";

const fleet = (() => {
  async function get(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    if (r.status === 401) signIn();
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.json();
  }

  // The API needs the fleet's web token: the link `fleetd up` prints (/?token=...) sets it as a cookie.
  function signIn() {
    if (document.getElementById("sign-in")) return;
    const note = document.createElement("p");
    note.id = "sign-in";
    note.className = "error";
    note.textContent = "This page needs the fleet's web token: open the link `fleetd up` printed " +
      "(http://HOST:PORT/?token=...), or the token in <fleet home>/web-token as ?token=... .";
    document.body.prepend(note);
  }

  // el("td", {class: "x", dataset: {task: id}}, "text", childNode, ...)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function table(headers, rows) {
    return el("table", {},
      el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows));
  }

  function replace(id, node) {
    const old = document.getElementById(id);
    node.id = id;
    old.replaceWith(node);
  }

  const state = (s) => el("span", { class: `state state-${s}` }, s);
  const fmt = (x, digits = 4) => (x === null || x === undefined ? "" : Number(x).toFixed(digits));
  const signed = (x, digits = 4) => (x === null || x === undefined ? "" : (x >= 0 ? "+" : "") + Number(x).toFixed(digits));
  const gib = (b) => (b / 2 ** 30).toFixed(1);
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
  const taskHref = (id) => `/tasks/${id}`;
  const missionHref = (id) => `/missions/${id}`;

  // Re-render at most every 250 ms however many notes arrive: fresh within the 1 s budget.
  function debounce(fn, ms = 250) {
    let timer = null, again = false;
    return () => {
      if (timer) { again = true; return; }
      fn();
      timer = setTimeout(() => { timer = null; if (again) { again = false; fn(); } }, ms);
    };
  }

  // onNote(note) for every "changed" note; onAll() on workers changes and after reconnects.
  function live(onNote, onAll) {
    const badge = document.getElementById("live");
    const es = new EventSource("/api/events");
    es.addEventListener("open", () => { if (badge) { badge.textContent = "live"; badge.className = "live on"; } onAll(); });
    es.addEventListener("error", () => { if (badge) { badge.textContent = "reconnecting"; badge.className = "live off"; } });
    es.addEventListener("changed", (e) => onNote(JSON.parse(e.data)));
    es.addEventListener("workers", () => onAll("workers"));
    es.addEventListener("resync", () => onAll());
    return es;
  }

  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

  // lines: [{label, step: [...], value: [...]}] on one x axis (steps); redrawn in place.
  function plot(container, title, lines, { xLabel = "step", logX = false } = {}) {
    container.replaceChildren();
    if (!lines.length) { container.append(el("p", { class: "muted" }, "no points yet")); return; }
    const xs = [...new Set(lines.flatMap((l) => l.step))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const data = [xs];
    for (const l of lines) {
      const ys = new Array(xs.length).fill(null);
      l.step.forEach((s, i) => { ys[index.get(s)] = l.value[i]; });
      data.push(ys);
    }
    const width = Math.max(320, container.clientWidth || 640);
    new uPlot({
      title, width, height: 240,
      scales: { x: logX ? { time: false, distr: 3 } : { time: false } },
      series: [{ label: xLabel }, ...lines.map((l, i) => ({ label: l.label, stroke: PALETTE[i % PALETTE.length], spanGaps: true }))],
      legend: { show: lines.length <= 12 },
    }, data, container);
  }

  return { get, el, table, replace, state, fmt, signed, gib, when, taskHref, missionHref, debounce, live, plot };
})();
