// codex-relay admin page: plain DOM, no build step. Every number comes from /admin/api/… (store/stats.py).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"];
const DAY_MS = 86400000;
let timer = null;

// -- formatting ---------------------------------------------------------------------------------
const int = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"));
const dec = (v) => (v === null || v === undefined ? "–" : v.toLocaleString("en-US", {minimumFractionDigits: 1, maximumFractionDigits: 1}));
const pct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%");
// Dollars to the cent; below a cent two significant digits, so a small cost does not read as free.
function usd(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  const digits = a === 0 || a >= 0.01 ? 2 : Math.min(8, 1 - Math.floor(Math.log10(a)));
  return (v < 0 ? "-$" : "$") + a.toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: digits});
}
// No priced call is an unknown cost ("–"), not a free one; calls without a price are left out and counted.
const money = (s) => usd(s.cost) + (s.cost !== null && s.unpriced ? ` (${int(s.unpriced)} unpriced)` : "");
// The same in a table cell, the note on a line of its own to keep the column narrow.
function costCell(s) {
  const note = s.cost !== null && s.unpriced ? el("div", {class: "muted"}, `${int(s.unpriced)} unpriced`) : null;
  return el("td", {"data-col": "cost", "data-value": s.cost ?? "", class: "num", title: money(s)}, usd(s.cost), note);
}
// A client key's limit as "name used / limit"; a cost limit in dollars, a use nobody counts (rpm outside a relay) "–".
const limitText = (name, l) => {
  const fmt = /_cost(\[|$)/.test(name) ? usd : int;  // monthly_cost, weekly_cost[claude-opus-*]
  return `${name} ${fmt(l.used)} / ${fmt(l.limit)}`;
};
// What the node's badge says: the relay's view (state), which tells a node it does not route from an active one.
const STATE_TITLES = {
  "not routed": "In the database with its stats, but neither in the nodes file nor added on an admin page: " +
    "it gets no calls. Save it in the form to route it again.",
};
const utcDay = (date) => date.toISOString().slice(0, 10);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else node[k] = v;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// A table cell; data-col and data-value let tests and scripts read the raw number.
// An error cell is cut short to keep the table narrow: its title holds the whole text.
function cell(col, text, raw, cls, ...more) {
  return el("td", {"data-col": col, "data-value": raw === undefined ? null : raw, class: cls,
    title: cls === "error-text" && text ? text : null}, text, ...more);
}

function num(col, v, fmt = int) {
  return cell(col, fmt(v), v === null ? "" : v, "num");
}

function fill(table, rows) {
  const body = $("tbody", table);
  body.replaceChildren(...rows);
  if (!rows.length) {
    const cols = $("thead tr", table).children.length;
    body.append(el("tr", {}, el("td", {colSpan: cols, class: "muted"}, "nothing recorded")));
  }
}

function say(text, isError = false) {
  const box = $("#message");
  box.textContent = text;
  box.className = isError ? "error" : "ok";
  box.hidden = !text;
}

// -- API ----------------------------------------------------------------------------------------
async function api(path, body, method = body === undefined ? "GET" : "POST") {
  const init = {credentials: "same-origin"};
  if (method === "DELETE") init.method = method;
  else if (body !== undefined) {
    init.method = method;
    init.headers = {"content-type": "application/json"};
    init.body = JSON.stringify(body);
  }
  const resp = await fetch("/admin/api/" + path, init);
  if (resp.status === 401) {
    location.reload(); // the login form
    throw new Error("logged out");
  }
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}

function filterQuery() {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#filters"))) if (v) params.set(k, v);
  return params;
}

// -- panels -------------------------------------------------------------------------------------
// One row per node, and under a node with an error a second row that spells it out: a column wide enough
// for errors would push the buttons off a laptop's screen.
function renderNodes(nodes) {
  const columns = $("#nodes thead tr").children.length;
  fill($("#nodes"), nodes.flatMap((n) => {
    const known = n.status !== null;
    const state = n.state ?? n.status;
    const actions = el("div");
    if (known) {
      actions.append(el("button", {type: "button", onclick: () => editNode(n), "data-action": "edit"}, "Edit"));
      const disable = n.status !== "disabled";
      actions.append(el("button", {type: "button", "data-action": disable ? "disable" : "enable",
        onclick: () => toggleNode(n.node_id, disable)}, disable ? "Disable" : "Enable"));
      if (n.status === "failed") {  // enabling resets its circuit breaker: back in rotation at once
        actions.append(el("button", {type: "button", "data-action": "reset",
          onclick: () => toggleNode(n.node_id, false)}, "Reset"));
      }

    }
    const ping = n.last_ping_err ? "error" : n.last_ping_ms === null ? "–" : int(n.last_ping_ms) + " ms";
    const named = n.name && n.name !== n.node_id ? el("div", {class: "muted", "data-col": "name"}, n.name) : null;
    const row = el("tr", {"data-node": n.node_id ?? "", class: n.last_error || n.last_ping_err ? "has-error" : null},
      el("td", {"data-col": "node"}, n.node_id ?? "(no node)", named),
      cell("status", el("span", {class: "badge " + (state ? state.replace(" ", "-") : "none"), title: STATE_TITLES[state]},
        state ?? "–"), state ?? ""),
      num("weight", n.weight),
      ...outcomeCells(n),
      num("health", n.health_rate, pct),
      num("avg_ttfb_ms", n.avg_ttfb_ms, dec),
      num("stream_ms_per_token", n.stream_ms_per_token, dec),
      num("input_tokens", n.input_tokens),
      // The hit rate under the cached tokens: one more column would not fit a laptop's screen.
      cell("cached_tokens", int(n.cached_tokens), n.cached_tokens, "num",
        el("div", {class: "muted", "data-col": "cache_hit_rate", "data-value": n.cache_hit_rate ?? ""},
          pct(n.cache_hit_rate))),
      num("output_tokens", n.output_tokens),
      num("reasoning_tokens", n.reasoning_tokens),
      num("bytes", n.bytes),
      cell("lifetime", `${int(n.lifetime_attempts)} / ${int(n.lifetime_failed_attempts)}`, n.lifetime_attempts, "num"),
      cell("key", n.api_key_hint ?? "–"),
      cell("ping", ping, undefined, n.last_ping_err ? "bad-text" : null),
      el("td", {class: "actions"}, actions));
    const errors = [n.last_error ? "last error: " + n.last_error : null,
      n.last_ping_err ? "ping: " + n.last_ping_err : null].filter(Boolean);
    if (!errors.length) return [row];
    return [row, el("tr", {class: "node-error", "data-error-of": n.node_id ?? ""}, el("td"),
      el("td", {colSpan: columns - 1, "data-col": "last_error"}, errors.join(" · ")))];
  }));
  $("#nodes-note").hidden = !nodes.some((n) => n.state === "not routed");
  $("#node-list").replaceChildren(...nodes.filter((n) => n.node_id).map((n) => el("option", {value: n.node_id})));
}

// requests = successes + failures (the node's fault) + aborted (by the client) + refused (store/stats.py).
function outcomeCells(s) {
  return [num("requests", s.requests), num("failures", s.failures), num("aborted", s.aborted), num("refused", s.refused)];
}

function metricRow(key, label, s) {
  return el("tr", {"data-key": key ?? ""}, cell("key", label), ...outcomeCells(s),
    num("health", s.health_rate, pct), num("input_tokens", s.input_tokens), num("output_tokens", s.output_tokens),
    costCell(s), num("avg_ttfb_ms", s.avg_ttfb_ms, dec));
}

// Seconds as "3 d 4 h", "2 h 5 min", "4 min 10 s" or "12 s".
function duration(v) {
  if (v === null || v === undefined) return "–";
  const t = Math.round(v);
  const [d, h, m] = [Math.floor(t / 86400), Math.floor(t / 3600) % 24, Math.floor(t / 60) % 60];
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : m ? `${m} min ${t % 60} s` : `${t} s`;
}

// The fleet's day: every figure from the database every relay writes to, whichever relay answers.
function renderOverview(o) {
  const shown = {requests: int(o.requests), tokens: int(o.total_tokens), cost: money(o), error_rate: pct(o.error_rate),
    ttfb_p95_ms: o.ttfb_p95_ms === null ? "–" : int(o.ttfb_p95_ms) + " ms"};
  const raw = {requests: o.requests, tokens: o.total_tokens, cost: o.cost, error_rate: o.error_rate,
    ttfb_p95_ms: o.ttfb_p95_ms};
  for (const card of document.querySelectorAll("#overview .card")) {
    const name = card.dataset.card;
    const value = $("b", card);
    value.textContent = shown[name];
    value.dataset.value = raw[name] ?? "";
  }
  $("#overview-day").textContent = `${o.day} (UTC), every relay on the database`;
}

// One row per relay by its heartbeat; under them the running relays' writers added up.
const WRITER_COUNTS = ["queued", "written", "spooled"];
const WRITER_STATES = {ok: "ok", unreachable: "DATABASE UNREACHABLE", stalled: "WRITER STALLED"};
function renderRelays(data) {
  const rows = data.relays.map((r) => el("tr", {"data-relay": r.relay, class: r.state === "gone" || r.lost ? "bad" : null},
    cell("name", r.name), cell("relay", r.relay + (r.relay === data.answered_by ? " (this one)" : "")),
    cell("version", r.version),
    cell("state", el("span", {class: "badge " + r.state}, r.state), r.state),
    num("uptime_s", r.uptime_s, duration), cell("seen_s_ago", duration(r.seen_s_ago) + " ago", r.seen_s_ago, "num"),
    cell("writer", WRITER_STATES[r.writer] ?? "none", r.writer ?? "", r.writer && r.writer !== "ok" ? "bad-text" : null,
      r.stalls ? el("div", {class: "muted", "data-col": "stalls"}, `${int(r.stalls)} stalls`) : null),
    ...WRITER_COUNTS.map((k) => num(k, r[k])), cell("failed", `${int(r.rejected)} / ${int(r.lost)}`, r.rejected + r.lost, "num"),
    cell("last_error", r.last_error ?? "", undefined, "error-text")));
  fill($("#relays"), rows);
  const running = data.relays.filter((r) => r.state === "running");
  const sum = (k) => running.reduce((total, r) => total + r[k], 0);
  $("#relays tfoot").replaceChildren(el("tr", {"data-relay": "fleet"}, cell("name", `fleet (${running.length} running)`),
    el("td", {colSpan: 6}), ...WRITER_COUNTS.map((k) => num(k, sum(k))),
    cell("failed", `${int(sum("rejected"))} / ${int(sum("lost"))}`, sum("rejected") + sum("lost"), "num"), el("td")));
  $("#answered-by").textContent = data.answered_by ? `This page was answered by ${data.answered_by}.` : "";
}

function renderRecent(calls) {
  fill($("#recent"), calls.map((c) => el("tr", {"data-invoke": c.invoke_id, class: c.status === "success" ? "" : "bad"},
    cell("time", c.occurred_at.replace("T", " ").slice(0, 19)), cell("client_key", c.client_key ?? "–"),
    cell("source", c.source), cell("node", c.node_id ?? "–"),
    cell("model", c.model ?? "–"), cell("status", c.status ?? "–"), num("http_status", c.http_status),
    num("input_tokens", c.input_tokens), num("cached_tokens", c.cached_tokens), num("output_tokens", c.output_tokens),
    cell("cost", usd(c.cost), c.cost ?? "", "num"), num("ttfb_ms", c.ttfb_ms), num("duration_ms", c.duration_ms), num("attempts", c.attempts),
    cell("error", c.error_message ?? "", undefined, "error-text"))));
}

// The hourly rollup's percentiles (store/histogram.py buckets), the latest 48 hours first; the chart
// draws TTFB p50/p95/p99 over the same hours, oldest left.
function renderHours(hours) {
  const shown = hours.slice(-48);
  drawLines($("#chart-hours"), shown.map((h) => h.hour), [
    ["p50", shown.map((h) => h.ttfb_p50_ms)], ["p95", shown.map((h) => h.ttfb_p95_ms)],
    ["p99", shown.map((h) => h.ttfb_p99_ms)]], "ms TTFB");
  $("#hours-legend").replaceChildren(...["p50", "p95", "p99"].map((name, k) => {
    const swatch = el("i");
    swatch.style.background = COLORS[k % COLORS.length];
    return el("span", {class: "key"}, swatch, name);
  }));
  fill($("#hours"), hours.slice(-48).reverse().map((h) => el("tr", {"data-key": h.hour}, cell("hour", h.hour),
    ...outcomeCells(h), num("ttfb_p50_ms", h.ttfb_p50_ms), num("ttfb_p95_ms", h.ttfb_p95_ms),
    num("ttfb_p99_ms", h.ttfb_p99_ms), num("duration_p50_ms", h.duration_p50_ms),
    num("duration_p95_ms", h.duration_p95_ms), num("duration_p99_ms", h.duration_p99_ms))));
}

// -- the per-day chart: stacked bars per source, one SVG per metric ----------------------------
function dayRange(days, since, until) {
  const known = days.map((d) => d.day).sort();
  const first = since || known[0];
  const last = until || (known.length ? known[known.length - 1] : first);
  const out = [];
  if (!first) return out;
  for (let t = Date.parse(first + "T00:00:00Z"); t <= Date.parse(last + "T00:00:00Z") && out.length < 400; t += DAY_MS) {
    out.push(utcDay(new Date(t)));
  }
  return out;
}

// 1, 2 or 5 times a power of ten, at least `raw` (and at least 1: counts are whole).
function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

// The y axis of a chart of `values`: a nice step and the maximum it rounds up to.
function scaleOf(values) {
  const step = niceStep(Math.max(1, ...values) / 4);
  return [step, step * Math.ceil(Math.max(1, ...values) / step)];
}

// An SVG element maker that collects what it makes: a chart is replaced in one go.
function collector() {
  const parts = [];
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    parts.push(node);
    return node;
  };
  return [parts, add];
}

// Horizontal grid lines with their labels, every `step` up to `max`; `y` maps a value to its height.
function gridLines(add, step, max, y, left, width) {
  for (let tick = 0; tick <= max; tick += step) {
    add("line", {x1: left, x2: width, y1: y(tick), y2: y(tick), class: "grid"});
    add("text", {x: left - 4, y: y(tick) + 4, "text-anchor": "end", class: "axis"}, int(tick));
  }
}

function drawChart(svg, axisDays, sources, value, metric) {
  const W = 560, H = 220, left = 56, bottom = 24, top = 8;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("aria-label", metric + " per day");
  const totals = axisDays.map((day) => sources.reduce((sum, s) => sum + (value.get(day + "|" + s) || 0), 0));
  const [step, max] = scaleOf(totals);
  const slot = (W - left) / Math.max(1, axisDays.length);
  const bar = Math.max(2, slot * 0.7);
  const scale = (H - top - bottom) / max;
  const [parts, add] = collector();
  gridLines(add, step, max, (v) => H - bottom - v * scale, left, W);
  const labelEvery = Math.ceil(axisDays.length / 8);
  axisDays.forEach((day, i) => {
    const x = left + i * slot + (slot - bar) / 2;
    let y = H - bottom;
    sources.forEach((source, k) => {
      const v = value.get(day + "|" + source) || 0;
      if (!v) return;
      const h = v * scale;
      y -= h;
      const rect = add("rect", {x, y, width: bar, height: Math.max(h, 0.5), fill: COLORS[k % COLORS.length],
        "data-day": day, "data-source": source, "data-value": v});
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${day} ${source}: ${int(v)} ${metric}`;
      rect.append(title);
    });
    add("rect", {x, y: H - bottom - totals[i] * scale, width: bar, height: 0, class: "total",
      "data-day": day, "data-total": totals[i]});
    if (i % labelEvery === 0) add("text", {x: x + bar / 2, y: H - 6, "text-anchor": "middle", class: "axis"}, day.slice(5));
  });
  svg.replaceChildren(...parts);
}

// One polyline per series over evenly spaced labels; a missing value (no call timed) breaks nothing.
function drawLines(svg, labels, series, unit) {
  const W = 560, H = 200, left = 56, bottom = 24, top = 8;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("aria-label", unit + " per hour");
  const values = series.flatMap(([, vs]) => vs.filter((v) => v !== null && v !== undefined));
  const [step, max] = scaleOf(values);
  const x = (i) => left + (labels.length > 1 ? i * (W - left - 8) / (labels.length - 1) : (W - left) / 2);
  const y = (v) => H - bottom - v * (H - top - bottom) / max;
  const [parts, add] = collector();
  gridLines(add, step, max, y, left, W);
  series.forEach(([name, vs], k) => {
    const points = vs.map((v, i) => (v === null || v === undefined ? null : [x(i), y(v)])).filter(Boolean);
    const color = COLORS[k % COLORS.length];
    if (points.length > 1) add("polyline", {points: points.map((p) => p.join(",")).join(" "), fill: "none",
      stroke: color, "stroke-width": 2, "data-series": name});
    // A dot per value: one hour of data is a point, which a line alone would not show.
    for (const [cx, cy] of points) add("circle", {cx, cy, r: 2.5, fill: color, "data-series": name});
  });
  const labelEvery = Math.max(1, Math.ceil(labels.length / 6));
  labels.forEach((label, i) => {
    // "MM-DD HH" of an ISO hour: the hours may span days.
    if (i % labelEvery === 0) add("text", {x: x(i), y: H - 6, "text-anchor": "middle", class: "axis"}, label.slice(5, 13));
  });
  svg.replaceChildren(...parts);
}

function renderDays(days, query) {
  const sources = [...new Set(days.map((d) => d.source))].sort();
  const axisDays = dayRange(days, query.get("since"), query.get("until"));
  const tokens = new Map(days.map((d) => [d.day + "|" + d.source, d.total_tokens]));
  const requests = new Map(days.map((d) => [d.day + "|" + d.source, d.requests]));
  drawChart($("#chart-tokens"), axisDays, sources, tokens, "tokens");
  drawChart($("#chart-requests"), axisDays, sources, requests, "requests");
  $("#legend").replaceChildren(...sources.map((s, k) => {
    const swatch = el("i");
    swatch.style.background = COLORS[k % COLORS.length]; // CSSOM: allowed by the page's CSP, unlike style=""
    return el("span", {class: "key", "data-source": s}, swatch, s);
  }));
  fill($("#days"), days.map((d) => el("tr", {"data-day": d.day, "data-source": d.source},
    cell("day", d.day), cell("source", d.source), ...outcomeCells(d),
    num("input_tokens", d.input_tokens), num("cached_tokens", d.cached_tokens), num("output_tokens", d.output_tokens),
    num("reasoning_tokens", d.reasoning_tokens), num("total_tokens", d.total_tokens))));
  $("#source-list").replaceChildren(...sources.map((s) => el("option", {value: s})));
}

// Teams: each key's day, refusals by reason in the cell's title, each limit as "name used/limit".
function renderKeys(keys) {
  const reasons = ["model", "nodes", "rate", "concurrency", "budget"];
  fill($("#keys"), keys.map((k) => el("tr", {"data-key": k.client_key},
    cell("key", k.client_key), num("requests", k.requests),
    el("td", {"data-col": "refused", "data-value": k.refused, class: "num",
              title: reasons.map((r) => `${r}: ${k["refused_" + r]}`).join(", ")}, int(k.refused)),
    num("total_tokens", k.total_tokens), num("cache_hit_rate", k.cache_hit_rate ?? null, pct),
    cell("cost", usd(k.cost), k.cost, "num"),
    cell("month_cost", usd(k.month_cost), k.month_cost, "num"),
    // One limit a line, when it resets in its title.
    el("td", {"data-col": "limits"}, ...Object.entries(k.limits || {}).map(([name, l]) =>
      el("div", {title: l.resets_at ? "resets " + l.resets_at : null}, limitText(name, l))), k.limits && Object.keys(k.limits).length ? null : "–"))));
}

// The keys in the database: limits as "name value", actions by state (a file key's secret is the file's).
const KEY_LIMITS = ["models", "nodes", "endpoints", "daily_requests", "daily_tokens", "monthly_cost", "rpm", "concurrency",
  "budgets", "expires_at", "warn_at"];
// A budget as ./run.sh keys --budget writes it: WINDOW:UNIT=LIMIT[:GLOB,GLOB]; several joined by "; ".
const BUDGET_UNITS = ["requests", "tokens", "cost"];
function budgetText(b) {
  const unit = BUDGET_UNITS.find((u) => u in b);
  return `${b.window}:${unit}=${b[unit]}` + (b.models ? ":" + b.models.join(",") : "");
}
function parseBudgets(text) {
  return text.split(";").map((t) => t.trim()).filter(Boolean).map((t) => {
    const [head, rest = ""] = t.split("=");
    const [window, unit] = head.split(":").map((x) => x.trim());
    const [limit, globs = ""] = rest.split(":");
    const models = list(globs);
    return {window, [unit]: Number(limit), ...(models.length ? {models} : {})};
  });
}
function keyField(f, v) {
  if (f === "budgets") return v.map(budgetText).join("; ");
  return Array.isArray(v) ? v.join(", ") : f === "monthly_cost" ? usd(v) : ["expires_at", "warn_at"].includes(f) ? v : int(v);
}
function renderStoredKeys(keys) {
  fill($("#stored-keys"), keys.map((k) => {
    const limits = KEY_LIMITS.filter((f) => k[f] !== null && !(f === "budgets" && !k[f].length)).map((f) =>
      el("div", {title: (k.file_fields || []).includes(f) ? "set by the keys file" : null}, `${f} ${keyField(f, k[f])}`));
    const actions = el("td", {class: "actions"});
    if (!k.revoked) {
      actions.append(el("button", {type: "button", onclick: () => editKey(k), "data-action": "edit"}, "Edit"));
      if (k.source === "admin") {
        actions.append(el("button", {type: "button", onclick: () => keyAction(k.name, "rotate"), "data-action": "rotate"},
          "Rotate"));
      }
      actions.append(el("button", {type: "button", onclick: () => keyAction(k.name, "revoke"), "data-action": "revoke"},
        "Revoke"));
    }
    return el("tr", {"data-key": k.name}, cell("key", k.name), cell("source", k.source),
      cell("state", k.revoked ? "revoked" : "active"), el("td", {"data-col": "limits"}, ...limits, limits.length ? null : "–"),
      actions);
  }));
}

// -- refresh ------------------------------------------------------------------------------------
async function refresh() {
  const query = filterQuery();
  // Recent calls: the day filters above, and the panel's own key, model and count.
  const recentQuery = new URLSearchParams(query);
  for (const [k, v] of new FormData($("#recent-form"))) if (v) recentQuery.set(k, v); else recentQuery.delete(k);
  const today = new URLSearchParams(query.get("until") ? {until: query.get("until")} : {});
  try {
    const [overview, relays, nodes, days, models, sources, recent, keys] = await Promise.all([
      api("overview?" + today), api("relays"), api("nodes?" + query), api("days?" + query), api("models?" + query),
      api("sources?" + query), api("recent?" + recentQuery), api("keys?" + query)]);
    renderOverview(overview.overview);
    renderRelays(relays);
    renderNodes(nodes.nodes);
    renderDays(days.days, query);
    fill($("#models"), models.models.map((m) => metricRow(m.model, m.model ?? "(unknown)", m)));
    $("#model-list").replaceChildren(...models.models.filter((m) => m.model).map((m) => el("option", {value: m.model})));
    fill($("#sources"), sources.sources.map((s) => metricRow(s.source, s.source, s)));
    renderRecent(recent.invocations);
    renderHours((await api("hours?" + query)).hours);
    renderKeys(keys.keys);
    renderStoredKeys(keys.stored);
    $("#key-list").replaceChildren(...keys.stored.map((k) => el("option", {value: k.name})));
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    say("Could not load: " + e.message, true);
  }
}

function schedule() {
  clearInterval(timer);
  const seconds = Number($("#refresh").value);
  if (seconds) timer = setInterval(() => { if (!document.hidden) refresh(); }, seconds * 1000);
}

// -- node management ----------------------------------------------------------------------------
// The node form's fields as the API takes them; on an edit only those that differ from the node are sent.
const NODE_FIELDS = {
  name: (f) => f.name.value.trim(),
  base_url: (f) => f.base_url.value.trim(),
  weight: (f) => Number(f.weight.value),
  formats: (f) => list(f.formats.value),
  models: (f) => list(f.models.value),
  model_map: (f) => Object.fromEntries(list(f.model_map.value).map((pair) => pair.split("=").map((s) => s.trim()))),
};
let editing = null;  // the node being edited, as the API listed it

function editNode(n) {
  const form = $("#node-form");
  editing = n;
  form.elements.id.value = n.node_id;
  form.elements.id.readOnly = true;
  form.elements.name.value = n.name ?? "";
  form.elements.base_url.value = n.base_url ?? "";
  form.elements.api_key.value = "";
  form.elements.api_key.placeholder = "unchanged (" + (n.api_key_hint ?? "none") + ")";
  form.elements.weight.value = n.weight;
  form.elements.formats.value = (n.formats ?? []).join(", ");
  form.elements.models.value = (n.models ?? []).join(", ");
  form.elements.model_map.value = Object.entries(n.model_map ?? {}).map(([k, v]) => k + "=" + v).join(", ");
  // What the nodes file sets is the file's: shown, not editable here (the API answers 409).
  for (const name of [...Object.keys(NODE_FIELDS), "api_key"]) {
    const owned = (n.file_fields ?? []).includes(name);
    form.elements[name].readOnly = owned;
    form.elements[name].title = owned ? "set by the nodes file: change it there" : "";
  }
  $("#node-form-title").textContent = "Edit node " + n.node_id;
  $("#node-form-delete").hidden = (n.file_fields ?? []).length > 0;  // the file's node: back at the next start
  form.elements.weight.focus();
}

function newNode() {
  const form = $("#node-form");
  editing = null;
  form.reset();
  for (const input of form.elements) { input.readOnly = false; input.title = ""; }
  form.elements.api_key.placeholder = "";
  $("#node-form-title").textContent = "Add a node";
  $("#node-form-delete").hidden = true;
}

// "a, b" -> ["a", "b"]: the node form's list fields
const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

async function saveNode(event) {
  event.preventDefault();
  const f = event.target.elements;
  const body = {id: f.id.value.trim()};
  for (const [name, read] of Object.entries(NODE_FIELDS)) {
    const value = read(f);
    const before = editing && (name === "name" ? editing.name ?? "" : editing[name] ?? (name === "model_map" ? {} : []));
    if (!editing || JSON.stringify(value) !== JSON.stringify(before)) body[name] = value;
  }
  if (!editing && !body.name) body.name = body.id;
  if (f.api_key.value) body.api_key = f.api_key.value;
  try {
    const {node} = await api("nodes", body);
    say(`Node ${node.node_id} saved: weight ${node.weight}.`);
    newNode();
    await refresh();
  } catch (e) {
    say("Not saved: " + e.message, true);
  }
}

async function toggleNode(id, disable) {
  try {
    await api(`nodes/${encodeURIComponent(id)}/${disable ? "disable" : "enable"}`, {});
    say(`Node ${id} ${disable ? "disabled: it gets no new calls" : "enabled"}.`);
    await refresh();
  } catch (e) {
    say("Not changed: " + e.message, true);
  }
}

async function deleteNode(id) {
  if (!confirm(`Node ${id} will be deleted on every relay: its calls keep their stats. Go on?`)) return;
  try {
    await api(`nodes/${encodeURIComponent(id)}`, undefined, "DELETE");
    say(`Node ${id} deleted.`);
    newNode();
    await refresh();
  } catch (e) {
    say("Not deleted: " + e.message, true);
  }
}

// -- key management -----------------------------------------------------------------------------
let editingKey = null;  // the key being edited, as the API listed it

function editKey(k) {
  const form = $("#key-form");
  form.elements.name.value = k.name;
  form.elements.name.readOnly = true;
  editingKey = k;
  for (const f of KEY_LIMITS) {
    const input = form.elements[f];
    if (!input) continue;
    input.value = k[f] === null ? "" : f === "budgets" ? k[f].map(budgetText).join("; ")
      : Array.isArray(k[f]) ? k[f].join(", ") : k[f];
    input.dataset.shown = input.value;  // a save sends only the fields changed from this
    const owned = (k.file_fields ?? []).includes(f);  // the keys file's: the API answers 409
    input.readOnly = owned;
    input.title = owned ? "set by the keys file: change it there" : "";
  }
  $("#key-form-title").textContent = "Edit key " + k.name;
}

function newKey() {
  const form = $("#key-form");
  editingKey = null;
  form.reset();
  for (const input of form.elements) { input.readOnly = false; input.title = ""; }
  $("#key-form-title").textContent = "Add a key";
}

async function saveKey(event) {
  event.preventDefault();
  const f = event.target.elements;
  const editing = editingKey !== null;
  const body = {};
  for (const name of KEY_LIMITS) {
    const input = f[name];
    if (!input) continue;
    const value = input.value.trim();
    // A new key gets only the limits filled in; an edit sends the fields changed, an emptied one as "no limit".
    if (editing ? value === input.dataset.shown : value === "") continue;
    body[name] = value === "" ? null : input.type === "number" ? Number(value) : name === "budgets" ? parseBudgets(value)
      : name === "expires_at" ? value : list(value);
  }
  try {
    const name = f.name.value.trim();
    const answer = editing ? await api("keys/" + encodeURIComponent(name), body, "PATCH")
      : await api("keys", {name, ...body});
    say(answer.secret ? `Key ${name} added. Its secret, shown this once: ${answer.secret}` : `Key ${name} saved.`);
    newKey();
    await refresh();
  } catch (e) {
    say("Not saved: " + e.message, true);
  }
}

async function keyAction(name, action) {
  const what = action === "revoke" ? "refused from now on, on every relay" : "given a new secret; the old one is refused";
  if (!confirm(`Key ${name} will be ${what}. Go on?`)) return;
  try {
    const answer = await api(`keys/${encodeURIComponent(name)}/${action}`, {});
    say(answer.secret ? `Key ${name} rotated. Its new secret, shown this once: ${answer.secret}` : `Key ${name} revoked.`);
    await refresh();
  } catch (e) {
    say("Not changed: " + e.message, true);
  }
}

// -- reconciliation -----------------------------------------------------------------------------
async function showReconcile(event) {
  event.preventDefault();
  const day = $("#reconcile-form").elements.date.value;
  const box = $("#reconcile");
  try {
    const data = await api("reconcile" + (day ? "?date=" + day : ""));
    if (!data.configured) {
      box.replaceChildren(el("p", {class: "muted"}, "No stats sources configured (codex_stats_sources)."));
      return;
    }
    const polls = el("ul", {class: "muted"}, ...data.polls.map((line) => el("li", {}, "last poll: " + line)));
    box.replaceChildren(polls, ...data.results.map((r) => {
      if (r.error) return el("p", {class: "error"}, `${r.source}: ${r.error}`);
      if (!r.captured_at) return el("p", {class: "muted"}, `${r.source}: no provider snapshot of ${r.stats_date}.`);
      const rows = r.rows.map((x) => el("tr", {class: x.within ? "" : "bad"}, cell("model", x.model ?? "(all models)"),
        cell("metric", x.metric), num("provider", x.provider), num("relay", x.relay), num("diff", x.diff),
        num("rel", x.rel, pct)));
      return el("div", {}, el("h3", {}, `${r.source} ${r.stats_date}: ${r.ok ? "OK" : "MISMATCH"}`),
        el("table", {}, el("thead", {}, el("tr", {}, ...["model", "metric", "provider", "relay", "diff", "rel"]
          .map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));
    }));
  } catch (e) {
    box.replaceChildren(el("p", {class: "error"}, e.message));
  }
}

// -- start --------------------------------------------------------------------------------------
async function start() {
  const filters = $("#filters");
  filters.elements.since.value = utcDay(new Date(Date.now() - 13 * DAY_MS)); // two weeks, today included
  filters.addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  $("#refresh").addEventListener("change", schedule);
  $("#recent-form").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  $("#recent-form").elements.limit.addEventListener("change", refresh);
  $("#node-form").addEventListener("submit", saveNode);
  $("#node-form-reset").addEventListener("click", newNode);
  $("#node-form-delete").addEventListener("click", () => deleteNode(editing.node_id));
  $("#key-form").addEventListener("submit", saveKey);
  $("#key-form-reset").addEventListener("click", newKey);
  $("#reconcile-form").addEventListener("submit", showReconcile);
  $("#reconcile-form").elements.date.value = utcDay(new Date());
  try {
    $("#logout").hidden = !(await api("session")).login;
  } catch (e) {
    say("Could not load: " + e.message, true);
  }
  await refresh();
  schedule();
}

start();
