// tollgate's dashboard: plain DOM, no framework and no build step. Text from the server is only ever
// set as text (never as HTML), and every change carries the session's CSRF token.
"use strict";

const state = { csrf: null, keys: [], sort: { by: "name", dir: 1 }, near: false };

function h(tag, attrs, ...children) {
  const svg = ["svg", "rect", "line", "polyline", "circle", "text", "g", "title"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, options = {}) {
  const headers = { "content-type": "application/json" };
  if (options.method && options.method !== "GET") headers["x-csrf-token"] = state.csrf || "";
  const resp = await fetch("/dashboard/api/" + path, { credentials: "same-origin", ...options, headers });
  if (resp.status === 401) { showLogin(); throw new Error("Signed out"); }
  const body = resp.status === 204 ? null : await resp.json();
  if (!resp.ok) throw new Error((body && body.message) || resp.statusText);
  return body;
}

const fmt = (n) => Number(n || 0).toLocaleString("en-US");
const when = (secs) => secs ? new Date(secs * 1000).toISOString().slice(0, 16).replace("T", " ") + "Z" : "never";

function showLogin() {
  document.getElementById("login").hidden = false;
  document.getElementById("view").replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
}

async function start() {
  document.getElementById("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    const resp = await fetch("/dashboard/login", {
      method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
      body: JSON.stringify({ accessKeyId: form.get("accessKeyId"), secretAccessKey: form.get("secretAccessKey") }),
    });
    const body = await resp.json();
    if (!resp.ok) { document.getElementById("login-error").textContent = body.message; return; }
    e.target.reset();
    await signedIn();
  });
  document.getElementById("logout").addEventListener("click", async () => {
    await api("../logout", { method: "POST" }).catch(() => {});
    showLogin();
  });
  window.addEventListener("hashchange", route);
  await signedIn();
}

async function signedIn() {
  let session;
  try { session = await api("session"); } catch { return; }
  state.csrf = session.csrf;
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = !session.login;
  document.getElementById("user").textContent = session.user;
  await route();
}

async function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const view = document.getElementById("view");
  const page = hash.startsWith("/keys") ? "keys" : hash === "/plans" ? "plans" : hash === "/customers" ? "customers" : "overview";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    if (hash.startsWith("/keys/")) await keyPage(view, decodeURIComponent(hash.slice(6)));
    else if (hash === "/keys") await keysPage(view);
    else if (hash === "/plans") await plansPage(view);
    else if (hash === "/customers") await customersPage(view);
    else await overviewPage(view);
  } catch (err) {
    view.replaceChildren(h("p", { class: "error" }, err.message));
  }
}

// A daily bar chart: per day, admitted requests and, beside them, refusals (throttled and quota
// exceeded stacked), so refusals are never read against the quota line; with an optional line. On a
// phone the drawing is narrower, so its text stays readable when scaled down.
function chart(days, series, line) {
  const narrow = window.matchMedia("(max-width: 640px)").matches;
  const W = narrow ? 420 : 900, H = narrow ? 220 : 260, L = 48, B = 24, T = 10, font = narrow ? 13 : 11;
  const sides = [0, 1].map((side) => days.map((_, i) =>
    series.filter((x) => x.side === side).reduce((s, x) => s + (x.values[i] || 0), 0)));
  const top = Math.max(1, ...sides.flat(), ...(line ? [line.limit, ...line.values.filter((v) => v !== null)] : []));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const bw = (W - L) / days.length;
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-days": days.length });
  for (const frac of [0, 0.5, 1]) {
    const v = Math.round(top * frac);
    svg.append(h("line", { x1: L, x2: W, y1: y(v), y2: y(v), stroke: "#e4e7ec" }));
    svg.append(h("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": font, fill: "#667085" }, fmt(v)));
  }
  // A few days (a new key's) do not make bars as wide as the chart.
  const half = Math.max(1, Math.min(bw - 2, 48) / 2);
  const left = (i) => L + i * bw + (bw - 2 * half) / 2;
  days.forEach((day, i) => {
    const base = [0, 0];
    const g = h("g", { class: "day", "data-date": day });
    for (const s of series) {
      const v = s.values[i] || 0;
      const at = base[s.side];
      if (v > 0) {
        g.append(h("rect", { x: left(i) + s.side * half, width: half, y: y(at + v), height: y(at) - y(at + v), fill: s.color, class: s.cls },
          h("title", {}, `${day}: ${fmt(v)} ${s.name}`)));
      }
      base[s.side] += v;
    }
    svg.append(g);
    if (i % Math.ceil(days.length / (narrow ? 3 : 6)) === 0) {
      svg.append(h("text", { x: L + i * bw, y: H - 6, "font-size": font, fill: "#667085" }, day.slice(5)));
    }
  });
  if (line) {
    const points = line.values.map((v, i) => v === null ? null : `${L + i * bw + bw / 2},${y(v)}`).filter(Boolean).join(" ");
    svg.append(h("line", { x1: L, x2: W, y1: y(line.limit), y2: y(line.limit), stroke: "#c2410c", "stroke-dasharray": "6 4", class: "quota-limit" }));
    svg.append(h("polyline", { points, fill: "none", stroke: "#2f5fd0", "stroke-width": 2, class: "quota-line" }));
    // One day has no line to draw: its point is marked.
    if (!points.includes(" ") && points) {
      const [cx, cy] = points.split(",");
      svg.append(h("circle", { cx, cy, r: 4, fill: "#2f5fd0" }));
    }
  }
  const legend = h("div", { class: "legend" }, series.map((s) => h("span", {}, h("i", { class: s.cls }), s.name)),
    line ? h("span", {}, h("i", { class: "line" }), line.name) : null,
    line ? h("span", {}, h("i", { class: "limit" }), `quota ${fmt(line.limit)}`) : null);
  return h("div", {}, svg, legend);
}

// Admitted requests on the left of each day (side 0), refusals on the right (side 1); with
// `shadow`, what plans tried in shadow let through but would have refused, beside the refusals.
const SERIES = (allowed, throttled, quota, shadow) => [
  { name: "allowed", values: allowed, color: "#2e7d5b", cls: "allowed", side: 0 },
  { name: "throttled (429)", values: throttled, color: "#e0a100", cls: "throttled", side: 1 },
  { name: "quota exceeded (429)", values: quota, color: "#c2410c", cls: "quota", side: 1 },
  ...(shadow ? [{ name: "would have refused (shadow)", values: shadow, color: "#7c6fd6", cls: "shadow", side: 1 }] : []),
];

// A latency quantile from the overview: in the first bucket it is only known to be under the bound.
const ms = (q) => !q ? "–"
  : (q.under ? "< " : "") + (q.seconds * 1000).toFixed(q.seconds < 0.01 ? 2 : 0) + " ms";

async function overviewPage(view) {
  const o = await api("overview");
  const lat = o.latency;
  const sum = (a) => a.reduce((x, y) => x + y, 0);
  const allowed = sum(o.allowed), refused = sum(o.throttled) + sum(o.quotaExceeded);
  const wouldHave = sum(o.wouldHaveRefused);
  const share = allowed + refused ? (100 * refused / (allowed + refused)).toFixed(1) + "%" : "–";
  const top = (items, empty) => items.length
    ? h("ol", { class: "top" }, items.map((k) => h("li", {}, h("a", { href: `#/keys/${encodeURIComponent(k.id)}` }, k.name || k.id), h("b", {}, fmt(k.count)))))
    : h("p", { class: "muted" }, empty);
  view.replaceChildren(
    h("h1", {}, "Overview"),
    h("div", { class: "stats" },
      h("div", { class: "stat" }, h("b", { id: "stat-allowed" }, fmt(allowed)), h("span", {}, "allowed, 30 days")),
      h("div", { class: "stat" }, h("b", {}, fmt(refused)), h("span", {}, "refused 429, 30 days")),
      h("div", { class: "stat" }, h("b", { id: "stat-429" }, share), h("span", {}, "429 share")),
      h("div", { class: "stat" }, h("b", { id: "stat-403" }, fmt(o.forbidden)), h("span", { title: "No key, an unknown, disabled or expired one; this instance since it started" }, "refused 403 (this instance)")),
      wouldHave ? h("div", { class: "stat" }, h("b", { id: "stat-shadow" }, fmt(wouldHave)), h("span", { title: "Let through by plans tried in shadow (enforcement: shadow); enforced, they would have been refused 429" }, "would have refused, 30 days")) : null,
      h("div", { class: "stat" }, h("b", { id: "stat-p50" }, ms(lat.p50)), h("span", {}, "p50 latency (this instance)")),
      h("div", { class: "stat" }, h("b", {}, ms(lat.p99)), h("span", {}, "p99 latency (this instance)"))),
    h("div", { class: "card" }, h("h2", {}, "Requests per day with a key, by decision"),
      chart(o.days, SERIES(o.allowed, o.throttled, o.quotaExceeded, wouldHave ? o.wouldHaveRefused : null))),
    h("div", { class: "grid2" },
      h("div", { class: "card" }, h("h2", {}, "Top consumers"), top(o.topByVolume, "No requests yet.")),
      h("div", { class: "card" }, h("h2", {}, "Most refused"), top(o.topByRefusals, "Nobody was refused."))));
}

function quotaCell(plans) {
  const q = plans.map((p) => p.quota).filter(Boolean);
  if (!q.length) return h("span", { class: "muted" }, "no quota");
  return h("div", {}, q.map((x) => h("div", { class: "quota" },
    h("progress", { value: x.used, max: x.limit }), " ",
    h("span", { class: "mono" }, `${fmt(x.used)} / ${fmt(x.limit)}`), " ",
    h("span", { class: "muted hide-narrow" }, `resets ${x.resets}`))));
}

const quotaShare = (k) => Math.max(0, ...k.plans.map((p) => p.quota ? p.quota.used / Math.max(1, p.quota.limit) : 0));

async function keysPage(view) {
  const search = h("input", { type: "search", id: "key-search", placeholder: "Name starts with…", title: "Any case" });
  const near = h("input", { type: "checkbox", id: "near-quota" });
  near.checked = state.near;
  const body = h("tbody", { id: "keys-body" });
  const note = h("p", { class: "muted" });
  // On a phone, the plans and last use give way to the quota.
  const columns = [["name", "Name"], ["plans", "Plans", "hide-narrow"], ["enabled", "Enabled"], ["lastUsedDate", "Last used", "hide-narrow"], ["quota", "This period"]];
  const head = h("tr", {}, columns.map(([by, label, cls]) => h("th", {
    class: "sortable " + (cls || ""), "data-sort": by,
    onclick: () => { state.sort = { by, dir: state.sort.by === by ? -state.sort.dir : 1 }; render(); },
  }, label)));
  const value = (k, by) => by === "plans" ? k.plans.map((p) => p.name).join(",") : by === "quota" ? quotaShare(k) : by === "lastUsedDate" ? (k.lastUsedDate || 0) : k[by];
  function render() {
    const { by, dir } = state.sort;
    const rows = state.keys.filter((k) => !near.checked || quotaShare(k) >= 0.8)
      .sort((a, b) => (value(a, by) > value(b, by) ? 1 : value(a, by) < value(b, by) ? -1 : 0) * dir);
    body.replaceChildren(...rows.map((k) => h("tr", { "data-key": k.id },
      h("td", {}, h("a", { href: `#/keys/${encodeURIComponent(k.id)}` }, k.name), h("div", { class: "muted mono" }, k.id)),
      h("td", { class: "hide-narrow" }, k.plans.map((p) => p.name).join(", ") || h("span", { class: "muted" }, "none")),
      h("td", {}, h("span", { class: "pill " + (k.enabled ? "on" : "off") }, k.enabled ? "enabled" : "disabled")),
      h("td", { class: "mono hide-narrow" }, when(k.lastUsedDate)),
      h("td", {}, quotaCell(k.plans)))));
    note.textContent = `${rows.length} key(s)` + (state.more ? " shown; narrow the search to see others" : "");
  }
  async function load() {
    const q = search.value.trim();
    const data = await api("keys" + (q ? "?q=" + encodeURIComponent(q) : ""));
    state.keys = data.keys; state.more = data.more;
    render();
  }
  let timer;
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(load, 250); });
  near.addEventListener("change", () => { state.near = near.checked; render(); });
  const plans = (await api("plans")).plans;
  view.replaceChildren(
    h("h1", {}, "API keys"),
    h("div", { class: "toolbar" }, search, h("label", {}, near, " at 80% of a quota or more")),
    h("div", { class: "table-wrap" }, h("table", { id: "keys-table" }, h("thead", {}, head), body)),
    note,
    createKeyForm(plans, load));
  await load();
}

// The form creating a key; `created` runs once one is (the list shows it at once).
function createKeyForm(plans, created) {
  const out = h("div", { id: "created" });
  const name = h("input", { name: "name", id: "new-key-name", required: true });
  const plan = h("select", { name: "plan", id: "new-key-plan" }, h("option", { value: "" }, "(no plan)"),
    plans.map((p) => h("option", { value: p.id }, p.name)));
  const form = h("form", { class: "inline-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const key = await api("keys", { method: "POST", body: JSON.stringify({ name: name.value, usagePlanId: plan.value }) });
      const value = h("code", { id: "new-key-value" }, key.value);
      const copy = h("button", { type: "button", id: "copy-key-value", class: "secondary", onclick: async () => {
        try { await navigator.clipboard.writeText(key.value); copy.textContent = "Copied"; }
        catch { getSelection().selectAllChildren(value); copy.textContent = "Selected: press Ctrl+C"; }
      } }, "Copy");
      out.replaceChildren(h("div", { class: "secret" },
        h("b", {}, `Key ${key.name} (${key.id}) created. `), "Its value is shown this once: ", value, " ", copy));
      name.value = "";
      await created();
    } catch (err) { out.replaceChildren(h("p", { class: "error" }, err.message)); }
  } }, h("label", {}, "Name", name), h("label", {}, "Usage plan", plan), h("button", { type: "submit" }, "Create key"));
  return h("div", { class: "card" }, h("h2", {}, "Create a key"), form, out);
}

async function keyPage(view, id) {
  const d = await api("keys/" + encodeURIComponent(id));
  const k = d.key;
  const change = async () => {
    await api(`keys/${encodeURIComponent(id)}/enabled`, { method: "POST", body: JSON.stringify({ enabled: !k.enabled }) });
    await route();
  };
  // Disabling cuts a partner off at once: it is confirmed first.
  const toolbar = h("div", { class: "toolbar" });
  const ask = () => toolbar.replaceChildren(
    h("span", { class: "error" }, `Disable ${k.name}? Requests with its value get 403 at once.`),
    h("button", { id: "confirm-disable", class: "danger", onclick: change }, "Disable"),
    h("button", { class: "secondary", onclick: () => toolbar.replaceChildren(toggle) }, "Cancel"));
  const toggle = h("button", { id: "toggle-enabled", class: k.enabled ? "danger" : "", onclick: k.enabled ? ask : change },
    k.enabled ? "Disable key" : "Enable key");
  toolbar.append(toggle);
  const sections = d.plans.map((p) => {
    const days = p.days;
    const limit = p.quota ? p.quota.limit : null;
    const line = limit === null ? null : {
      name: `used this ${p.quota.period.toLowerCase()}`,
      values: days.map((x) => limit - x.remaining),
      limit,
    };
    const remaining = h("input", { type: "number", min: 0, name: "remaining", class: "remaining" });
    const msg = h("span", { class: "muted" });
    const form = limit === null ? null : h("form", { class: "inline-form", onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api(`keys/${encodeURIComponent(id)}/remaining`, { method: "POST", body: JSON.stringify({ usagePlanId: p.id, remaining: Number(remaining.value) }) });
        await route();
      } catch (err) { msg.textContent = err.message; }
    } }, h("label", {}, "Left this period", remaining), h("button", { type: "submit" }, "Set"), msg);
    const today = days[days.length - 1] || { remaining: limit };
    const methods = Object.entries(p.methodThrottles || {});
    return h("div", { class: "card plan", "data-plan": p.id },
      h("h2", {}, `Plan ${p.name}`),
      h("p", { class: "muted" },
        p.throttle ? `Throttle ${p.throttle.rateLimit}/s, burst ${p.throttle.burstLimit}. ` : "No throttle. ",
        limit === null ? "No quota." : `Quota ${fmt(limit)} per ${p.quota.period.toLowerCase()}; ${fmt(today.remaining)} left now.`),
      methods.length ? h("ul", { class: "methods muted" }, methods.map(([m, t]) =>
        h("li", {}, h("span", { class: "mono" }, m), `: ${t.rateLimit}/s, burst ${t.burstLimit}`))) : null,
      chart(d.days, SERIES(days.map((x) => x.used), days.map((x) => x.throttled), days.map((x) => x.quotaExceeded)), line),
      form);
  });
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/keys" }, "← Keys")),
    h("h1", {}, k.name, " ", h("span", { id: "key-state", class: "pill " + (k.enabled ? "on" : "off") }, k.enabled ? "enabled" : "disabled")),
    h("p", { class: "muted" }, h("span", { class: "mono" }, k.id), ` · created ${when(k.createdDate)} · last used ${when(k.lastUsedDate)}`,
      k.valuePrefix ? ` · value starts ${k.valuePrefix}… (${k.valueLength} characters)` : "",
      k.expiresAt ? ` · expires ${k.expiresAt}` : "",
      k.previousValueExpiresAt ? ` · the previous value works until ${k.previousValueExpiresAt}` : ""),
    toolbar,
    ...(sections.length ? sections : [h("p", { class: "muted" }, "This key is in no usage plan.")]));
}

async function plansPage(view) {
  const plans = (await api("plans")).plans;
  view.replaceChildren(
    h("h1", {}, "Usage plans"),
    h("div", { class: "table-wrap" }, h("table", { id: "plans-table" },
      h("thead", {}, h("tr", {}, ["Name", "Throttle", "Quota", "API stages", "Keys", "This period"].map((t) => h("th", {}, t)))),
      h("tbody", {}, plans.map((p) => h("tr", { "data-plan": p.id },
        h("td", {}, p.name, h("div", { class: "muted mono" }, p.id)),
        h("td", {}, p.throttle ? `${p.throttle.rateLimit}/s, burst ${p.throttle.burstLimit}` : "–"),
        h("td", {}, p.quota ? `${fmt(p.quota.limit)} / ${p.quota.period.toLowerCase()}` : "–"),
        h("td", {}, p.apiStages.map((s) => `${s.apiId}:${s.stage}`).join(", ") || "–"),
        h("td", {}, fmt(p.keys)),
        h("td", {}, fmt(p.usedThisPeriod), p.resets ? h("div", { class: "muted" }, `resets ${p.resets}`) : null)))))));
}

// Customers of plans that share limits by customer: what their keys used together, what is left.
async function customersPage(view) {
  const customers = (await api("customers")).customers;
  const table = h("div", { class: "table-wrap" }, h("table", { id: "customers-table" },
    h("thead", {}, h("tr", {}, ["Customer", "Usage plan", "Keys", "This period", "Left"].map((t) => h("th", {}, t)))),
    h("tbody", {}, customers.map((c) => h("tr", { "data-customer": c.customerId, "data-plan": c.usagePlanId },
      h("td", { class: "mono" }, c.customerId),
      h("td", {}, c.usagePlanName),
      h("td", {}, ...c.keys.map((k) => h("div", {}, h("a", { href: `#/keys/${encodeURIComponent(k.id)}` }, k.name || k.id)))),
      h("td", { class: "used" }, fmt(c.usedThisPeriod)),
      h("td", { class: "left" }, c.remaining === null ? "–" : fmt(c.remaining), c.resets ? h("div", { class: "muted" }, `resets ${c.resets}`) : null))))));
  view.replaceChildren(
    h("h1", {}, "Customers"),
    customers.length ? table
      : h("p", { class: "muted" }, "No usage plan shares its limits by customer: give one limitsShareBy: customerId (or the tag tollgate:limitsShareBy=customerId)."));
}

start();
