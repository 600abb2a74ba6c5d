/* repage dashboard: refreshes the server-rendered page from the JSON endpoints every few seconds.
 * No build step: plain ES2017 plus the vendored uPlot (static/vendor). The formatting functions
 * mirror repage/dashboard.py (fmt_*), so a refreshed number reads exactly as the server wrote it.
 * Every value from the server goes into the page as text (textContent), never as markup. */
(function () {
  "use strict";

  var STATE_ORDER = ["verified", "migrated", "skipped", "unrecoverable", "running", "pending", "deferred",
                     "review", "failed", "rolled_back"];
  var PATH_ORDER = ["keys", "pdf", "reprocess", "none"];
  var DONE = ["migrated", "verified", "skipped", "unrecoverable"];
  var body = document.body;
  var refreshMs = Number(body.dataset.refreshMs) || 5000;
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.content : "";
  var chosenWindow = "";  // "" = auto
  var charts = {};
  var refreshes = 0;
  var timer = null;

  // ---------------------------------------------------------------- formatting (as dashboard.py)

  function thousands(text) {
    var parts = text.split(".");
    parts[0] = parts[0].replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return parts.join(".");
  }
  function humanSeconds(s) {
    var units = [["d", 86400], ["h", 3600], ["min", 60]];
    for (var i = 0; i < units.length; i++) {
      if (s >= units[i][1]) { return (s / units[i][1]).toFixed(1) + " " + units[i][0]; }
    }
    return s.toFixed(1) + " s";
  }
  var fmt = {
    count: function (n) { return thousands(String(Math.trunc(n || 0))); },
    rate: function (x) { return x.toFixed(2) + "/s"; },
    dollars: function (x) {
      if (x === null || x === undefined) { return "none"; }
      return "$" + (x >= 100 ? thousands(x.toFixed(2)) : x.toFixed(4));
    },
    eta: function (s, todo) { return !todo ? "done" : (s === null ? "unknown" : humanSeconds(s)); },
    ms: function (s) { return s === null || s === undefined ? "no reads" : (s * 1000).toFixed(1) + " ms"; },
    pct: function (part, whole) { return whole ? (100 * part / whole).toFixed(1) + "%" : "0.0%"; },
    time: function (t) {
      return t === null || t === undefined ? "never"
        : new Date(Math.floor(t) * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
    }
  };

  // ---------------------------------------------------------------- small DOM helpers

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; }
      else if (k === "style") { Object.assign(node.style, attrs[k]); }
      else { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { node.appendChild(c); });
    return node;
  }
  function ordered(keys, order) {
    return keys.slice().sort(function (a, b) {
      var ia = order.indexOf(a), ib = order.indexOf(b);
      ia = ia < 0 ? order.length : ia; ib = ib < 0 ? order.length : ib;
      return ia - ib || (a < b ? -1 : a > b ? 1 : 0);
    });
  }
  function field(path, value, text, tag, cls) {
    var attrs = {"data-field": path, "data-value": value === null || value === undefined ? "" : JSON.stringify(value),
                 text: text};
    if (cls) { attrs["class"] = cls; }
    return el(tag || "span", attrs);
  }
  function replaceChildren(node, children) {
    while (node.firstChild) { node.removeChild(node.firstChild); }
    children.forEach(function (c) { node.appendChild(c); });
  }

  // ---------------------------------------------------------------- the numbers

  function lookup(root, path) {
    var keys = path.split(".");
    var value = root;
    for (var i = 0; i < keys.length; i++) {
      if (value === null || value === undefined) { return undefined; }
      value = value[keys[i]];
    }
    return value;
  }
  function formatField(path, value, status) {
    if (path === "status.eta_seconds") { return fmt.eta(value, status.todo); }
    if (path.indexOf("status.throughput.") === 0) { return fmt.rate(value); }
    if (path === "status.dollars_spent" || path === "status.dollars_projected") { return fmt.dollars(value); }
    if (path === "data.budget_dollars") { return value === null ? "not set" : fmt.dollars(value); }
    if (path.indexOf("data.reprocess_dollars.") === 0) { return fmt.dollars(value); }
    if (path === "data.read_latency.p95_seconds") { return fmt.ms(value); }
    if (path === "data.last_migrated_at") { return fmt.time(value); }
    return fmt.count(value);
  }
  function updateFields(status, data) {
    var root = {status: status, data: data};
    document.querySelectorAll("[data-field]").forEach(function (node) {
      var path = node.dataset.field;
      if (path.indexOf("status.by_state_and_path.") === 0) { return; }  // the matrix is rebuilt
      var value = lookup(root, path);
      if (value === undefined) { value = path.indexOf("status.by_") === 0 ? 0 : null; }
      node.dataset.value = value === null ? "" : JSON.stringify(value);
      node.textContent = formatField(path, value, status);
    });
    document.getElementById("done-pct").textContent = fmt.pct(status.done, status.documents);
  }

  function renderBars(status) {
    var perPath = {};
    status.by_state_and_path.forEach(function (r) {
      (perPath[r.path] = perPath[r.path] || {})[r.state] = r.documents;
    });
    var rows = [["all documents", status.by_state, status.documents]];
    ordered(Object.keys(perPath), PATH_ORDER).forEach(function (p) {
      var total = Object.keys(perPath[p]).reduce(function (n, s) { return n + perPath[p][s]; }, 0);
      rows.push(["path " + p, perPath[p], total]);
    });
    var nodes = rows.map(function (row) {
      var counts = row[1], total = row[2];
      var segments = ordered(Object.keys(counts), STATE_ORDER).filter(function (s) { return counts[s] && total; })
        .map(function (s) {
          return el("span", {"class": "seg s-" + s, title: s + ": " + counts[s],
                             style: {width: (100 * counts[s] / total).toFixed(3) + "%"}});
        });
      var done = DONE.reduce(function (n, s) { return n + (counts[s] || 0); }, 0);
      return el("div", {"class": "bar-row"}, [
        el("span", {"class": "bar-label", text: row[0]}),
        el("span", {"class": "bar"}, segments),
        el("span", {"class": "bar-note",
                    text: fmt.count(done) + " of " + fmt.count(total) + " done (" + fmt.pct(done, total) + ")"})
      ]);
    });
    var legend = el("div", {"class": "legend"}, ordered(Object.keys(status.by_state), STATE_ORDER).map(function (s) {
      return el("span", {"class": "key"}, [el("span", {"class": "swatch s-" + s}), document.createTextNode(s)]);
    }));
    replaceChildren(document.getElementById("bars"), nodes.concat([legend]));
  }

  function renderMatrix(status) {
    var paths = ordered(Object.keys(status.by_path), PATH_ORDER);
    var states = ordered(Object.keys(status.by_state), STATE_ORDER);
    var cells = {};
    status.by_state_and_path.forEach(function (r) { cells[r.state + "\u0000" + r.path] = r.documents; });
    var head = el("tr", {}, [el("th", {text: "state \\ path"})].concat(
      paths.map(function (p) { return el("th", {text: p}); }), [el("th", {text: "all"})]));
    var rows = states.map(function (s) {
      var tds = paths.map(function (p) {
        var n = cells[s + "\u0000" + p] || 0;
        return el("td", {"class": "num"}, [field("status.by_state_and_path." + s + "." + p, n, fmt.count(n))]);
      });
      return el("tr", {}, [el("th", {}, [el("span", {"class": "swatch s-" + s}), document.createTextNode(s)])]
        .concat(tds, [el("td", {"class": "num total"}, [field("status.by_state." + s, status.by_state[s],
                                                               fmt.count(status.by_state[s]))])]));
    });
    var foot = el("tr", {}, [el("th", {text: "all"})].concat(paths.map(function (p) {
      return el("td", {"class": "num total"}, [field("status.by_path." + p, status.by_path[p], fmt.count(status.by_path[p]))]);
    }), [el("td", {"class": "num total"}, [field("status.documents", status.documents, fmt.count(status.documents))])]));
    var table = el("table", {"class": "matrix"}, [el("thead", {}, [head]), el("tbody", {}, rows), el("tfoot", {}, [foot])]);
    replaceChildren(document.getElementById("matrix"), [table]);
  }

  function fillTable(id, rows, empty) {
    var tbody = document.querySelector("#" + id + " tbody");
    var columns = document.querySelectorAll("#" + id + " thead th").length;
    if (!rows.length) {
      replaceChildren(tbody, [el("tr", {"class": "empty"}, [el("td", {colspan: String(columns), text: empty})])]);
      return;
    }
    replaceChildren(tbody, rows.map(function (row) {
      return el("tr", {}, row.map(function (cell) { return el("td", {text: cell}); }));
    }));
  }

  function renderTables(status, data) {
    fillTable("failures", status.last_errors.map(function (f) { return [f.document_id, f.state, f.error || ""]; }),
              "no failures");
    fillTable("reviews", data.reviews.map(function (r) {
      return [r.document_id, r.dataset_id, r.reason, fmt.time(r.since)];
    }), "nothing waits for review");
    fillTable("hot", data.hot.map(function (h) {
      return [h.document_id, h.dataset_id || "", h.accesses.toFixed(2), h.state || "not scanned", h.enqueued ? "yes" : ""];
    }), "no accesses recorded");
  }

  function renderBudget(status, data) {
    var budget = data.budget_dollars, spent = status.dollars_spent, projected = status.dollars_projected;
    var top = Math.max(budget || 0, projected, spent) || 1;
    var bar = document.querySelector("#kpi-dollars .budget-bar");
    var children = [el("span", {"class": "seg projected", style: {width: (100 * projected / top).toFixed(3) + "%"}}),
                    el("span", {"class": "seg spent", style: {width: (100 * spent / top).toFixed(3) + "%"}})];
    if (budget !== null) {
      children.push(el("span", {"class": "budget-mark", title: "budget", style: {left: (100 * budget / top).toFixed(3) + "%"}}));
    }
    replaceChildren(bar, children);
    document.getElementById("kpi-dollars").classList.toggle("warn", budget !== null && projected > budget);
  }

  function workerText(data) {
    if (data.paused) { return ["paused", "paused"]; }
    var w = data.worker;
    if (!w) { return ["idle", "not paused"]; }  // the worker runs elsewhere (repage worker), if at all
    if (w.error || w.alive === false) { return ["failed", "worker stopped: " + (w.error || "not running")]; }
    var last = w.last_cycle || {};
    if (last.backed_off) { return ["backoff", "backing off (read p95 " + fmt.ms(last.read_latency_p95) + ")"]; }
    return ["running", "running"];
  }

  function renderHeader(data) {
    var badge = document.getElementById("run-state");
    var wt = workerText(data);
    badge.className = "badge " + wt[0];
    badge.textContent = wt[1];
    var updated = document.getElementById("updated");
    updated.dataset.epoch = String(data.now);
    updated.textContent = fmt.time(data.now);
    var pause = document.getElementById("pause-form"), resume = document.getElementById("resume-form");
    if (pause && resume) { pause.hidden = data.paused; resume.hidden = !data.paused; }
    var limit = data.read_latency.max_read_latency_s;
    document.getElementById("p95-limit").textContent = limit ? fmt.ms(limit) : "not set here";
    document.getElementById("window-label").textContent = humanSeconds(data.series.window_seconds);
  }

  // ---------------------------------------------------------------- charts (uPlot)

  function chartWidth(node) { return Math.max(320, node.clientWidth || 600); }

  function throughputData(s) {
    return [s.t, s.documents_per_s, s.chunks_per_s, s.object_requests_per_s];
  }
  function latencyData(s, limit) {
    var line = s.t.map(function () { return limit ? limit * 1000 : null; });
    return [s.t, s.read_p95_ms, line];
  }
  // The p95 sets the scale; the back-off line joins it only once reads come within a quarter of it.
  function latencyRange(u) {
    var peak = (u.data[1] || []).reduce(function (m, v) { return v === null ? m : Math.max(m, v); }, 0);
    var limit = (u.data[2] || []).reduce(function (m, v) { return v === null ? m : Math.max(m, v); }, 0);
    var top = limit && peak * 4 >= limit ? Math.max(peak, limit) : peak;
    return [0, Math.max(top * 1.2, 1)];
  }
  function stepped() { return uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({align: 1}) : undefined; }

  function makeCharts(data) {
    if (typeof uPlot === "undefined") { return; }  // the static SVG stays
    var box = document.getElementById("chart-throughput");
    replaceChildren(box, []);
    charts.throughput = new uPlot({
      width: chartWidth(box), height: 220,
      scales: {x: {time: true}, docs: {auto: true, range: function (u, lo, hi) { return [0, Math.max(hi, 0.1)]; }},
               ops: {auto: true, range: function (u, lo, hi) { return [0, Math.max(hi, 1)]; }}},
      series: [
        {},
        {label: "documents/s", scale: "docs", stroke: "#2f7d32", width: 2, fill: "rgba(47,125,50,.12)", paths: stepped(),
         points: {show: false},
         value: function (u, v) { return v === null ? "-" : v.toFixed(2); }},
        {label: "chunks/s", scale: "ops", stroke: "#1f5fbf", width: 2, paths: stepped(), points: {show: false},
         value: function (u, v) { return v === null ? "-" : v.toFixed(2); }},
        {label: "object requests/s", scale: "ops", stroke: "#b3541e", width: 2, paths: stepped(), points: {show: false},
         value: function (u, v) { return v === null ? "-" : v.toFixed(2); }}
      ],
      axes: [{}, {scale: "docs", label: "documents/s"}, {scale: "ops", side: 1, label: "chunks/s, requests/s",
                                                          grid: {show: false}}]
    }, throughputData(data.series), box);

    var lbox = document.getElementById("chart-latency");
    replaceChildren(lbox, []);
    charts.latency = new uPlot({
      width: chartWidth(lbox), height: 160,
      scales: {x: {time: true}, y: {auto: true, range: latencyRange}},
      series: [
        {},
        {label: "read p95 (ms)", stroke: "#7b3fb0", width: 2, spanGaps: false, points: {show: false},
         value: function (u, v) { return v === null ? "-" : v.toFixed(1); }},
        {label: "worker backs off above (ms)", stroke: "#a4161a", width: 1, dash: [6, 4], points: {show: false},
         value: function (u, v) { return v === null ? "-" : v.toFixed(0); }}
      ],
      axes: [{}, {label: "ms"}]
    }, latencyData(data.series, data.read_latency.max_read_latency_s), lbox);

    window.addEventListener("resize", function () {
      charts.throughput.setSize({width: chartWidth(box), height: 220});
      charts.latency.setSize({width: chartWidth(lbox), height: 160});
    });
  }

  function updateCharts(data) {
    if (!charts.throughput) { return; }
    charts.throughput.setData(throughputData(data.series));
    charts.latency.setData(latencyData(data.series, data.read_latency.max_read_latency_s));
  }

  // ---------------------------------------------------------------- refresh

  function render(status, data) {
    updateFields(status, data);
    renderBars(status);
    renderMatrix(status);
    renderTables(status, data);
    renderBudget(status, data);
    renderHeader(data);
    updateCharts(data);
  }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", cache: "no-store", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (!r.ok) { var err = new Error(url + ": HTTP " + r.status); err.status = r.status; throw err; }
        return r.json();
      });
  }

  function refresh() {
    clearTimeout(timer);
    var query = chosenWindow ? "?window=" + encodeURIComponent(chosenWindow) : "";
    return Promise.all([getJSON("migration/status"), getJSON("dashboard/data" + query)])
      .then(function (got) {
        render(got[0], got[1]);
        document.getElementById("stale").hidden = true;
        body.dataset.refreshes = String(++refreshes);
      })
      .catch(function (err) {
        if (err.status === 401) { window.location.reload(); return; }  // session gone: the login form
        document.getElementById("stale").hidden = false;
      })
      .then(function () { timer = setTimeout(refresh, refreshMs); });
  }

  function wireAdminForms() {
    document.querySelectorAll("form.admin-action").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        var button = form.querySelector("button");
        button.disabled = true;
        fetch(form.getAttribute("action"), {
          method: "POST", credentials: "same-origin", cache: "no-store",
          headers: {"Accept": "application/json", "X-CSRF-Token": csrf,
                    "Content-Type": "application/x-www-form-urlencoded"},
          body: new URLSearchParams(new FormData(form)).toString()
        }).then(function (r) {
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return refresh();
        }).catch(function (err) {
          window.alert("The service refused: " + err.message);
        }).then(function () { button.disabled = false; });
      });
    });
  }

  function start() {
    var initial = JSON.parse(document.getElementById("initial-data").textContent);
    var select = document.getElementById("window");
    select.hidden = false;
    select.addEventListener("change", function () { chosenWindow = select.value; refresh(); });
    makeCharts(initial.data);
    wireAdminForms();
    body.dataset.refreshes = "0";
    timer = setTimeout(refresh, refreshMs);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) { refresh(); } });
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
