// outpost dashboard: an MQTT 5 client of the gateway over WebSocket on /mqtt.
// Subscribes (QoS 0) to what /api/me says its user may read, keeps a short history per topic,
// and acts through the broker with the user's own ACL (PUBACK reason codes say refusals).
// Reconnects by itself with backoff; the credentials stay in this tab's memory only.
"use strict";
const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder(), text = new TextDecoder();

// ---- tunables -------------------------------------------------------------------------
const ROW_H = 26;            // px, one topic row
const STALE_MS = 30000;      // no message for this long: the row is marked old
const AGE_OUT_MS = 300000;   // and then dropped (retained topics stay, marked)
const HIST_MS = 300000;      // chart history per topic
const HIST_MAX = 240;        // points per topic
const TICK_MS = 250;

// ---- state ----------------------------------------------------------------------------
let info = null, me = null, creds = null, ws = null, connected = false, everConnected = false;
let attempt = 0, retryAt = 0, retryTimer = null, downSince = 0, pid = 1;
const clientId = "dashboard-" + Math.random().toString(16).slice(2, 10);
const pending = new Map();   // packet id -> callback(reason)
const topics = new Map();    // topic -> T
let chosen = null, field = null;
const folded = new Set();
const fieldFor = new Map();  // topic -> field the user picked
let structureDirty = true, chartDirty = true, overList = false;
let rows = [];               // the flattened visible rows (topic view)
const perf = { longTasks: [], frames: [] };
window.__outpost = { perf, topics, rows: () => rows, chosen: () => chosen, field: () => field };

// ---- small helpers --------------------------------------------------------------------
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
function str(s) { const b = utf8.encode(s); return [b.length >> 8, b.length & 255, ...b]; }
function varint(n) { const o = []; do { let d = n % 128; n = Math.floor(n / 128); if (n > 0) d |= 128; o.push(d); } while (n > 0); return o; }
function packet(type, body) { return new Uint8Array([type, ...varint(body.length), ...body]); }
function readVarint(b, i) { let n = 0, mul = 1, d; do { d = b[i++]; n += (d & 127) * mul; mul *= 128; } while (d & 128); return [n, i]; }
function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s < 90 ? s + " s" : s < 5400 ? Math.round(s / 60) + " min" : Math.round(s / 3600) + " h";
}
function setText(el, t) { if (el.textContent !== t) el.textContent = t; }
function selectionIn(el) {
  const s = window.getSelection();
  return s && !s.isCollapsed && s.rangeCount && el.contains(s.getRangeAt(0).commonAncestorContainer);
}
function authHeaders() {
  // The marker header keeps the server from sending a Basic challenge (the browser's own dialog).
  const h = { "x-outpost-page": "1" };
  if (creds && creds.user) h.Authorization = "Basic " + btoa(unescape(encodeURIComponent(creds.user + ":" + creds.pass)));
  return h;
}
async function getJson(path) {
  const r = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (r.status === 401) throw Object.assign(new Error("unauthorized"), { status: 401 });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}
const REASONS = { 0x10: "accepted (no subscribers)", 0x80: "unspecified error", 0x83: "implementation specific error",
  0x87: "not authorized", 0x90: "topic name invalid", 0x97: "quota exceeded", 0x99: "payload format invalid" };

// ---- info and login -------------------------------------------------------------------
async function loadInfo() {
  try { info = await getJson("info.json"); } catch (_) { return; }
  setText($("gw"), "gateway " + info.gateway);
  setText($("version"), "v" + info.version);
  $("listeners").innerHTML = "<tr><th>protocol</th><th>address</th></tr>" + info.listeners.map((l) => {
    // A wildcard bind is reached at the address this page came from.
    const url = l.url.replace(/\/\/(0\.0\.0\.0|\[::\])/, "//" + location.hostname);
    return `<tr><td>${esc(l.protocol)}</td><td><code>${esc(url)}</code></td></tr>`;
  }).join("");
}
loadInfo();

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("error").textContent = "";
  creds = { user: $("user").value, pass: $("pass").value };
  try {
    me = await getJson("api/me");
  } catch (err) {
    $("error").textContent = err.status === 401 ? (creds.user ? "wrong user or password" : "log in with a broker user") : "cannot reach the gateway";
    creds = null;
    return;
  }
  if (!info) await loadInfo(); // off loopback it needs the login
  connect();
});

// ---- connection, with backoff ---------------------------------------------------------
function connect() {
  clearTimeout(retryTimer); retryTimer = null;
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/mqtt";
  let sock;
  try { sock = new WebSocket(url, "mqtt"); } catch (_) { return scheduleRetry(); }
  ws = sock;
  sock.binaryType = "arraybuffer";
  let buf = new Uint8Array(0);
  sock.onopen = () => {
    let flags = 0x02; // clean start
    const body = [...str("MQTT"), 5, 0, 0, 30, 0, ...str(clientId)];
    if (creds.user) { flags |= 0x80; body.push(...str(creds.user)); }
    if (creds.pass) { flags |= 0x40; body.push(...str(creds.pass)); }
    body[7] = flags;
    sock.send(packet(0x10, body));
  };
  sock.onmessage = (e) => {
    const more = new Uint8Array(e.data), all = new Uint8Array(buf.length + more.length);
    all.set(buf); all.set(more, buf.length); buf = all;
    let off = 0;
    for (;;) {
      let len = 0, mul = 1, i = off + 1;
      for (; i < buf.length && i < off + 5; i++) { len += (buf[i] & 127) * mul; mul *= 128; if (!(buf[i] & 128)) break; }
      if (i >= buf.length || buf.length < i + 1 + len) break;
      handle(buf[off], buf.subarray(i + 1, i + 1 + len), sock);
      off = i + 1 + len;
    }
    buf = buf.slice(off);
  };
  sock.onclose = () => {
    if (ws !== sock) return;
    ws = null;
    for (const cb of pending.values()) cb(-1);
    pending.clear();
    if (connected || everConnected) lost(); else if ($("app").hidden) $("error").textContent ||= "connection closed";
    connected = false;
    if (creds && everConnected) scheduleRetry();
  };
}

function lost() {
  if (!downSince) downSince = Date.now();
  document.body.classList.add("stale");
  $("conn").className = "down";
  for (const r of document.querySelectorAll("#bridges tr, #plugs tr, #devices tr")) r.classList.add("old");
  banner();
}

function scheduleRetry() {
  // 1 s, 2 s, 4 s ... 30 s, each with jitter, so many open pages do not come back at once.
  const base = Math.min(30000, 1000 * 2 ** Math.min(attempt, 5));
  const wait = base / 2 + Math.random() * base / 2;
  attempt++;
  retryAt = Date.now() + wait;
  retryTimer = setTimeout(connect, wait);
  banner();
}

function banner() {
  const b = $("banner");
  if (connected || !downSince) { b.hidden = true; return; }
  b.hidden = false;
  const left = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
  setText(b, `Disconnected from the gateway since ${new Date(downSince).toLocaleTimeString()} (${ago(Date.now() - downSince)}): ` +
    `everything below is stale. Reconnecting ${left ? "in " + left + " s" : "now"} (attempt ${attempt}).`);
  setText($("conn"), "disconnected");
}

async function online(sock) {
  connected = true; attempt = 0;
  const again = everConnected;
  everConnected = true;
  downSince = 0;
  document.body.classList.remove("stale");
  $("login").hidden = true; $("app").hidden = false;
  $("conn").className = "up";
  setText($("conn"), again ? "connected (reconnected " + new Date().toLocaleTimeString() + ")" : "connected");
  banner();
  // Everything is read again: the gateway may have restarted with other settings.
  if (again) {
    loadInfo();
    try { me = await getJson("api/me"); } catch (_) { /* keep the last */ }
    for (const t of topics.values()) t.fresh = false;
  }
  if (sock !== ws) return;
  applyMe();
  const filters = me && me.filters ? me.filters.slice() : ["#"];
  if (me && me.admin) filters.push(me.bridge_reply + clientId);
  if (filters.length) subscribe(sock, filters);
  loadProblems();
}

function subscribe(sock, filters) {
  const id = nextPid();
  const body = [id >> 8, id & 255, 0];
  for (const f of filters) body.push(...str(f), 0);
  pending.set(id, (codes) => {
    const refused = filters.filter((_, i) => codes[i] >= 0x80);
    if (refused.length) setText($("listnote"), "the broker refused: " + refused.join(", "));
  });
  sock.send(packet(0x82, body));
}

function nextPid() { pid = pid % 65535 + 1; return pid; }

function handle(h, body, sock) {
  switch (h >> 4) {
    case 2: { // CONNACK: flags, reason, properties
      const code = body[1];
      if (code !== 0) {
        const why = code === 0x86 || code === 0x87 || code === 4 || code === 5 ? "wrong user or password" : "refused (code 0x" + code.toString(16) + ")";
        if (everConnected) {
          // The login stopped working (user removed, password changed): ask again.
          creds = null; everConnected = false; downSince = 0;
          $("app").hidden = true; $("login").hidden = false; $("banner").hidden = true;
        }
        $("error").textContent = why;
        sock.close();
        return;
      }
      online(sock);
      break;
    }
    case 3: { // PUBLISH
      const qos = (h >> 1) & 3, retain = (h & 1) === 1;
      const tl = (body[0] << 8) | body[1];
      const topic = text.decode(body.subarray(2, 2 + tl));
      let i = 2 + tl, id = 0;
      if (qos) { id = (body[i] << 8) | body[i + 1]; i += 2; }
      const [plen, j] = readVarint(body, i);
      seen(topic, text.decode(body.subarray(j + plen)), retain);
      if (qos === 1) sock.send(new Uint8Array([0x40, 2, id >> 8, id & 255]));
      if (qos === 2) sock.send(new Uint8Array([0x50, 2, id >> 8, id & 255]));
      break;
    }
    case 4: { // PUBACK: id, reason (absent = success)
      const id = (body[0] << 8) | body[1], cb = pending.get(id);
      pending.delete(id);
      if (cb) cb(body.length > 2 ? body[2] : 0);
      break;
    }
    case 6: { // PUBREL (we never publish QoS 2, but a server may deliver it)
      sock.send(new Uint8Array([0x70, 2, body[0], body[1]]));
      break;
    }
    case 9: { // SUBACK: id, properties, codes
      const id = (body[0] << 8) | body[1];
      const [plen, j] = readVarint(body, 2);
      const cb = pending.get(id);
      pending.delete(id);
      if (cb) cb([...body.subarray(j + plen)]);
      break;
    }
    case 14: { // DISCONNECT from the server, with its reason
      setText($("listnote"), "the gateway closed the connection (reason 0x" + (body[0] || 0).toString(16) + ")");
      break;
    }
  }
}
setInterval(() => { if (ws && connected) ws.send(new Uint8Array([0xc0, 0])); }, 20000);

/// Publishes through the broker; `done(text, ok)` gets what the broker said.
function publish(topic, payload, qos, retain, done) {
  if (!ws || !connected) return done("not connected", false);
  const bytes = utf8.encode(payload);
  const body = [...str(topic)];
  let id = 0;
  if (qos) { id = nextPid(); body.push(id >> 8, id & 255); }
  body.push(0, ...bytes);
  if (qos) {
    const t = setTimeout(() => { pending.delete(id); done("no answer from the broker", false); }, 10000);
    pending.set(id, (reason) => {
      clearTimeout(t);
      if (reason < 0) done("connection lost before the broker answered", false);
      else if (reason < 0x80) done(REASONS[reason] || "accepted", true);
      else done("refused by the broker: " + (REASONS[reason] || "0x" + reason.toString(16)), false);
    });
  }
  ws.send(packet(0x30 | (qos << 1) | (retain ? 1 : 0), body));
  if (!qos) done("sent (QoS 0: the broker does not answer; use QoS 1 to see a refusal)", true);
}

// ---- what arrives ---------------------------------------------------------------------
/// The numeric fields of a payload: a number, or a JSON object's numbers (one level down too).
function numbers(payload) {
  const out = {};
  const s = payload.trim();
  if (s !== "" && Number.isFinite(Number(s))) { out.value = Number(s); return out; }
  if (s[0] !== "{") return out;
  try {
    const j = JSON.parse(s);
    for (const [k, v] of Object.entries(j)) {
      if (typeof v === "number" && Number.isFinite(v)) out[k] = v;
      else if (v && typeof v === "object" && !Array.isArray(v))
        for (const [k2, v2] of Object.entries(v)) if (typeof v2 === "number" && Number.isFinite(v2)) out[k + "." + k2] = v2;
    }
  } catch (_) { /* not JSON */ }
  return out;
}

function seen(topic, payload, retain) {
  const now = Date.now();
  let t = topics.get(topic);
  if (!t) {
    t = { name: topic, count: 0, last: "", at: now, retained: false, hist: [], b: new Uint16Array(10), bs: 0, fresh: true };
    topics.set(topic, t);
    structureDirty = true;
  }
  t.count++; t.last = payload; t.at = now; t.fresh = true;
  // A retained message is a value the broker holds, not a live reading.
  t.retained = retain || (t.retained && payload !== "");
  bump(t, now);
  const nums = numbers(payload);
  if (Object.keys(nums).length) {
    t.hist.push([now, nums]);
    if (t.hist.length > HIST_MAX || now - t.hist[0][0] > HIST_MS) t.hist.shift();
    if (topic === chosen) chartDirty = true;
  }
  panels(topic, payload);
}

// Messages per second over the last 10 s: one counter per second, in a ring.
function advance(t, now) {
  const sec = Math.floor(now / 1000);
  if (sec <= t.bs) return sec;
  if (sec - t.bs >= 10) t.b.fill(0);
  else for (let s = t.bs + 1; s <= sec; s++) t.b[s % 10] = 0;
  t.bs = sec;
  return sec;
}
function bump(t, now) { t.b[advance(t, now) % 10]++; }
function rate(t, now) { advance(t, now); let n = 0; for (const x of t.b) n += x; return n / 10; }

// ---- panels: keyed rows, updated in place ---------------------------------------------
function applyMe() {
  if (!me) return;
  setText($("who"), me.user ? "as " + me.user + (me.admin ? " (admin)" : "") : "anonymous");
  $("notice").hidden = !me.notice;
  if (me.notice) setText($("noticetext"), me.notice);
  for (const p of me.plugs || []) plugRow(p);
}

function keyedRow(tbody, key, cells) {
  let tr = tbody.querySelector(`tr[data-key="${CSS.escape(key)}"]`);
  if (!tr) {
    const none = tbody.querySelector("tr.none");
    if (none) none.remove();
    tr = document.createElement("tr");
    tr.dataset.key = key;
    for (let i = 0; i < cells; i++) tr.appendChild(document.createElement("td"));
    const rowsNow = [...tbody.children];
    const after = rowsNow.find((r) => r.dataset.key > key);
    tbody.insertBefore(tr, after || null);
    markEmpty();
  }
  tr.classList.remove("old");
  return tr;
}

function panels(topic, payload) {
  const id = (info && info.gateway) || (me && me.gateway);
  if (!id) return;
  const gw = "outpost/" + id + "/";
  let m;
  if (me && me.admin && topic === me.bridge_reply + clientId) {
    // The bridge's own answer to this page's request: done, or why not.
    try {
      const r = JSON.parse(payload);
      const tr = $("bridges").querySelector(`tr[data-key="${CSS.escape(String(r.bridge || ""))}"]`);
      const out = tr && tr.cells[5] && tr.cells[5].querySelector(".act");
      if (out) { out.className = "act " + (r.ok ? "ok" : "no"); setText(out, r.ok ? r.action + ": done" : String(r.error)); }
    } catch (_) { /* not JSON */ }
  } else if (topic.startsWith(gw) && (m = topic.slice(gw.length).match(/^bridges\/([^/]+)\/state$/))) {
    try { bridges.set(m[1], JSON.parse(payload)); bridgeRow(m[1]); } catch (_) { /* not JSON */ }
  } else if (topic.startsWith(gw) && (m = topic.slice(gw.length).match(/^devices\/([^/]+)\/state$/))) {
    try { deviceRow(m[1], JSON.parse(payload)); } catch (_) { /* not JSON */ }
  } else if (me && me.plugs) {
    for (const p of me.plugs) {
      if (topic === p.state) { p.stateValue = payload.trim(); plugRow(p); }
      else if (topic === p.live) { try { p.liveValue = JSON.parse(payload); } catch (_) { /* keep */ } plugRow(p); }
    }
  }
}

const bridges = new Map();
function bridgeRow(name) {
  const b = bridges.get(name);
  const tr = keyedRow($("bridges"), name, 6);
  const c = tr.cells;
  setText(c[0], name);
  const state = b.paused ? "paused" : b.connected ? "up" : "down";
  c[1].className = state;
  setText(c[1], state);
  setText(c[2], "queued " + b.queued);
  setText(c[3], "oldest " + (b.oldest_age_s == null ? "-" : Math.round(b.oldest_age_s) + " s"));
  const dropped = Object.values(b.dropped || {}).reduce((a, x) => a + x, 0);
  setText(c[4], "dropped " + dropped);
  // The last error and how long it has been down: what an operator needs first.
  let extra = "";
  // A paused bridge is down on purpose: say so, not as an error.
  if (!b.connected && b.since_ms) extra = (b.paused ? "paused for " : "down for ") + ago(Date.now() - b.since_ms);
  if (b.last_error && !b.connected && !b.paused) extra += (extra ? " · " : "") + b.last_error;
  if (!c[5].querySelector(".msg")) {
    c[5].innerHTML = '<div class="msg err"></div><div class="acts"></div><div class="act"></div>';
  }
  setText(c[5].querySelector(".msg"), extra);
  const acts = c[5].querySelector(".acts");
  if (me && me.admin && !acts.childElementCount) {
    for (const a of ["pause", "resume", "restart"]) {
      const btn = document.createElement("button");
      btn.type = "button"; btn.textContent = a; btn.dataset.action = a;
      btn.addEventListener("click", () => bridgeAction(name, a, c[5].querySelector(".act")));
      acts.appendChild(btn);
    }
  }
}
function bridgeAction(name, action, out) {
  setText(out, action + "…");
  const req = JSON.stringify({ bridge: name, action, reply_to: me.bridge_reply + clientId });
  publish(me.bridge_request, req, 1, false, (t, ok) => {
    // The bridge's answer may come before the broker's PUBACK: never overwrite it.
    if (out.textContent !== action + "…") return;
    out.className = "act " + (ok ? "ok" : "no");
    setText(out, ok ? action + ": asked" : action + ": " + t);
  });
}

function deviceRow(name, state) {
  const tr = keyedRow($("devices"), name, 3);
  const d = state.counters || {};
  const rej = Object.values(d.rejected || {}).reduce((a, x) => a + x, 0);
  setText(tr.cells[0], name);
  setText(tr.cells[1], "last seen " + (d.last_seen_ms ? new Date(d.last_seen_ms).toLocaleTimeString() : "never"));
  setText(tr.cells[2], "rejected " + rej);
}

function plugRow(p) {
  const tr = keyedRow($("plugs"), p.name, 4);
  const c = tr.cells;
  setText(c[0], p.name);
  const st = p.stateValue || (p.liveValue && p.liveValue.state) || "unknown";
  c[1].className = st === "offline" ? "offline" : st === "on" ? "up" : "";
  setText(c[1], st);
  // An unreachable plug has no power reading: never show its last one as current.
  const w = st === "offline" || !p.liveValue || p.liveValue.power_w == null ? "—" : p.liveValue.power_w + " W";
  setText(c[2], w);
  if (p.may_set && !c[3].childElementCount) {
    for (const v of ["on", "off"]) {
      const btn = document.createElement("button");
      btn.type = "button"; btn.textContent = v; btn.dataset.plug = p.name; btn.dataset.set = v;
      btn.addEventListener("click", () => {
        const out = c[3].querySelector(".act");
        setText(out, "switching " + v + "…");
        publish(p.set, v, 1, false, (t, ok) => { out.className = "act " + (ok ? "ok" : "no"); setText(out, ok ? "asked " + v : t); });
      });
      c[3].appendChild(btn);
    }
    const out = document.createElement("span");
    out.className = "act";
    c[3].appendChild(out);
  }
}

const SEC_KIND = { login_refused: "login refused", publish_denied: "publish denied", subscribe_denied: "subscribe denied" };
async function loadProblems() {
  let p;
  try { p = await getJson("api/problems"); } catch (_) { return; }
  const counts = Object.values(p.counts).filter((c) => c.count > 0);
  const down = p.bridges.filter((b) => !b.connected);
  let html = "";
  for (const b of down) {
    html += `<div class="down">bridge ${esc(b.name)} ${b.paused ? "paused" : "down"}${b.down_for_s != null ? " for " + esc(ago(b.down_for_s * 1000)) : ""}</div>` +
      (b.last_error ? `<div class="err">${esc(b.last_error)}</div>` : "");
  }
  if (counts.length) html += "<table>" + counts.map((c) => `<tr><td>${esc(c.what)}</td><td>${c.count}</td></tr>`).join("") +
    `</table><div class="age">since the gateway started ${esc(new Date(p.since * 1000).toLocaleString())}</div>`;
  // Who was refused, from where, on what: every string here is a client's own, so escaped.
  // The most recent few, at most two per user (or address): one noisy client does not hide the rest.
  const sec = [], more = new Map();
  for (const e of p.security || []) {
    const k = e.username != null ? "user " + e.username : "address " + String(e.source || "").replace(/:\d+$/, "");
    const n = (more.get(k) || 0) + 1;
    more.set(k, n);
    if (n <= 2 && sec.length < 10) sec.push(e);
  }
  const hidden = [...more].filter(([, n]) => n > 2).map(([k, n]) => `${n - 2} more of ${k}`);
  if (sec.length) html += `<h2>Recent refusals${p.security_scope === "own" ? " under your name" : ""}</h2><table id="security">` +
    sec.map((e) => {
      const who = [e.username != null ? "user " + e.username : "no user name", e.client_id ? "client " + e.client_id : "",
        e.source ? "from " + e.source : ""].filter(Boolean).join(" · ");
      return `<tr data-kind="${esc(e.kind)}"><td>${esc(new Date(e.at_ms).toLocaleTimeString())}</td>` +
        `<td>${esc(SEC_KIND[e.kind] || e.kind)}${e.count > 1 ? " ×" + esc(e.count) : ""}</td><td>${esc(who)}<div class="err">${esc(e.topic || e.reason || "")}</div></td></tr>`;
    }).join("") + "</table>" + (hidden.length ? `<div class="age">${esc(hidden.join(", "))}</div>` : "");
  if (p.security_scope === "own" && counts.length) html += `<div class="age">refusals under other names are shown to dashboard admins</div>`;
  if (p.recent.length) html += "<h2>Most recent</h2><table>" + p.recent.slice(0, 5).map((e) =>
    `<tr><td>${esc(new Date(e.at_ms).toLocaleTimeString())}</td><td>${esc(e.detail)}</td></tr>`).join("") + "</table>";
  const el = $("problems");
  if (!selectionIn(el) && el.innerHTML !== (html || "none reported")) el.innerHTML = html || "none reported";
  markEmpty();
}
setInterval(() => { if (connected) loadProblems(); }, 5000);
setInterval(async () => {
  // New plugs appear in the plug service's report: read it again now and then.
  if (!connected) return;
  try { me = await getJson("api/me"); applyMe(); } catch (_) { /* next time */ }
}, 15000);

// ---- the topic view: a folded tree in a virtual list -----------------------------------
const list = $("topics"), spacer = $("spacer");
const rowEls = new Map(); // row key -> element
list.addEventListener("pointerenter", () => { overList = true; });
list.addEventListener("pointerleave", () => { overList = false; });
list.addEventListener("scroll", () => drawRows(Date.now()), { passive: true });
$("filter").addEventListener("input", () => { structureDirty = true; list.scrollTop = 0; });

function rebuild(now) {
  const f = $("filter").value.trim();
  for (const [name, t] of topics) {
    if (!t.retained && now - t.at > AGE_OUT_MS) { topics.delete(name); if (name === chosen) choose(null); }
  }
  const names = [...topics.keys()].filter((n) => !f || n.includes(f)).sort();
  const out = [];
  let prev = [];
  for (const name of names) {
    const levels = name.split("/");
    let hidden = false;
    for (let d = 0; d < levels.length - 1 && !hidden; d++) {
      const prefix = levels.slice(0, d + 1).join("/");
      const same = prev.length > d + 1 && prev.slice(0, d + 1).join("/") === prefix;
      if (!same) out.push({ key: "b:" + prefix, branch: true, prefix, label: levels[d] + "/", depth: d });
      hidden = folded.has(prefix);
    }
    prev = levels;
    if (!hidden) out.push({ key: "t:" + name, branch: false, topic: name, label: levels[levels.length - 1] || "(empty)", depth: levels.length - 1 });
  }
  rows = out;
  structureDirty = false;
  spacer.style.height = rows.length * ROW_H + "px";
  fitList();
  setText($("topiccount"), "(" + topics.size + ")");
}

// On a phone the list is only as tall as its rows (up to 45% of the screen), so a few topics
// do not leave a blank box between them and the chart.
const narrow = window.matchMedia("(max-width: 600px)");
function fitList() {
  const h = narrow.matches ? Math.round(Math.max(3 * ROW_H, Math.min(rows.length * ROW_H + 2, window.innerHeight * 0.45))) + "px" : "";
  if (list.style.height !== h) list.style.height = h;
}
window.addEventListener("resize", fitList);

function makeRow(r) {
  const el = document.createElement("div");
  el.className = "row" + (r.branch ? " branch" : " pick");
  el.innerHTML = '<span class="name"></span><span class="rate"></span><span class="count"></span><span class="payload"></span>';
  if (r.branch) el.dataset.prefix = r.prefix; else { el.dataset.topic = r.topic; el.title = r.topic; }
  el.firstChild.style.paddingLeft = r.depth * 0.9 + "em";
  return el;
}

function drawRows(now) {
  const first = Math.max(0, Math.floor(list.scrollTop / ROW_H) - 5);
  const last = Math.min(rows.length, Math.ceil((list.scrollTop + list.clientHeight) / ROW_H) + 5);
  const want = new Set();
  for (let i = first; i < last; i++) {
    const r = rows[i];
    want.add(r.key);
    let el = rowEls.get(r.key);
    if (!el) { el = makeRow(r); rowEls.set(r.key, el); spacer.appendChild(el); }
    const top = i * ROW_H + "px";
    if (el.style.top !== top) el.style.top = top;
    if (selectionIn(el)) continue; // someone is copying from it
    const s = el.children;
    if (r.branch) {
      setText(s[0], (folded.has(r.prefix) ? "▸ " : "▾ ") + r.label);
    } else {
      const t = topics.get(r.topic);
      if (!t) continue;
      setText(s[0], r.label);
      setText(s[1], rate(t, now).toFixed(1));
      setText(s[2], String(t.count));
      const old = now - t.at > STALE_MS;
      const p = t.last.length > 160 ? t.last.slice(0, 160) + "…" : t.last;
      setText(s[3], old ? (t.retained ? "retained · " : ago(now - t.at) + " ago · ") + p : p);
      el.classList.toggle("old", old || !t.fresh);
      el.classList.toggle("chosen", r.topic === chosen);
    }
  }
  for (const [k, el] of rowEls) {
    if (!want.has(k)) { el.remove(); rowEls.delete(k); }
  }
}

list.addEventListener("click", (e) => {
  const el = e.target.closest(".row");
  if (!el) return;
  if (el.dataset.prefix) {
    const p = el.dataset.prefix;
    folded.has(p) ? folded.delete(p) : folded.add(p);
    structureDirty = true;
    rebuild(Date.now()); drawRows(Date.now());
    return;
  }
  choose(el.dataset.topic);
});

function choose(topic) {
  chosen = topic;
  setText($("charted"), topic || "(click a topic)");
  $("clearchosen").hidden = !topic;
  setText($("chosenresult"), "");
  if (topic) $("ptopic").value = topic;
  fillFields();
  chartDirty = true;
  for (const el of rowEls.values()) el.classList.toggle("chosen", el.dataset.topic === topic);
  detail(true);
}

function fillFields() {
  const sel = $("field");
  const t = chosen && topics.get(chosen);
  const names = new Set();
  if (t) for (const [, v] of t.hist.slice(-20)) for (const k of Object.keys(v)) names.add(k);
  const list_ = [...names];
  // Time stamps and counters are numbers too, but rarely what one wants to see.
  const boring = (k) => /(^|[._])(ts|time|timestamp|epoch|seq|id|at|since|ms)$|_ms$|_at$/i.test(k);
  const pick = fieldFor.get(chosen) || list_.find((k) => !boring(k)) || list_[0] || null;
  const have = [...sel.options].map((o) => o.value).join("\n");
  if (have !== list_.join("\n")) sel.innerHTML = list_.map((k) => `<option>${esc(k)}</option>`).join("");
  field = pick;
  if (pick) sel.value = pick;
  sel.disabled = !list_.length;
}
$("field").addEventListener("change", (e) => { field = e.target.value; fieldFor.set(chosen, field); chartDirty = true; });

function detail(force) {
  const d = $("detail"), t = chosen && topics.get(chosen);
  d.hidden = !t;
  if (!t || selectionIn(d)) return; // never replace what is being selected
  const body = t.last;
  let shown = body;
  try { if (body.trim()[0] === "{") shown = JSON.stringify(JSON.parse(body), null, 1); } catch (_) { /* as is */ }
  if (force || d.textContent !== shown) setText(d, shown);
}

$("clearchosen").addEventListener("click", () => {
  const topic = chosen;
  publish(topic, "", 1, true, (t, ok) => {
    $("chosenresult").className = "act " + (ok ? "ok" : "no");
    setText($("chosenresult"), ok ? "retained message cleared" : t);
  });
});

// ---- the chart: time and value axes, sharp at the device's pixel ratio ------------------
function niceStep(span, n) {
  const raw = span / n, p = 10 ** Math.floor(Math.log10(raw)), f = raw / p;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
}
function chart(now) {
  const c = $("chart"), dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const t = chosen && topics.get(chosen);
  const pts = t && field ? t.hist.filter((p) => field in p[1]).map((p) => [p[0], p[1][field]]) : [];
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#666";
  if (!pts.length) { setText($("chartvalue"), ""); g.fillText(chosen ? "no numeric values for this topic yet" : "click a topic to chart it", 10, 20); return; }
  const L = 52, R = 8, T = 8, B = 22, pw = w - L - R, ph = h - T - B;
  let lo = Infinity, hi = -Infinity;
  for (const [, v] of pts) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (lo === hi) { lo -= 1; hi += 1; }
  const step = niceStep(hi - lo, 4);
  lo = Math.floor(lo / step) * step; hi = Math.ceil(hi / step) * step;
  const t1 = now, t0 = Math.min(pts[0][0], now - 60000);
  const x = (tm) => L + ((tm - t0) / (t1 - t0)) * pw, y = (v) => T + ph - ((v - lo) / (hi - lo)) * ph;
  g.strokeStyle = "#e5e7eb"; g.lineWidth = 1; g.textAlign = "right"; g.textBaseline = "middle";
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  for (let v = lo; v <= hi + step / 2; v += step) {
    const yy = Math.round(y(v)) + 0.5;
    g.beginPath(); g.moveTo(L, yy); g.lineTo(L + pw, yy); g.stroke();
    g.fillText(v.toFixed(digits), L - 4, yy);
  }
  // As many time labels as fit ("06:52:30 AM" is ~75 px): on a phone they would run together.
  const fit = Math.max(2, Math.min(5, Math.floor(pw / 90)));
  const span = t1 - t0, tstep = [10e3, 15e3, 30e3, 60e3, 120e3, 300e3].find((s) => span / s <= fit) || 600e3;
  g.textAlign = "center"; g.textBaseline = "top";
  let labels = 0;
  for (let tm = Math.ceil(t0 / tstep) * tstep; tm <= t1; tm += tstep, labels++) {
    const xx = Math.round(x(tm)) + 0.5;
    g.beginPath(); g.moveTo(xx, T); g.lineTo(xx, T + ph); g.stroke();
    g.fillText(new Date(tm).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }), xx, T + ph + 4);
  }
  window.__outpost.timeAxis = { labels, width: pw };
  g.strokeStyle = "#9ca3af"; g.beginPath(); g.moveTo(L + 0.5, T); g.lineTo(L + 0.5, T + ph); g.lineTo(L + pw, T + ph + 0.5); g.stroke();
  g.strokeStyle = "#2563eb"; g.lineWidth = 2; g.lineJoin = "round"; g.beginPath();
  pts.forEach(([tm, v], i) => (i ? g.lineTo(x(tm), y(v)) : g.moveTo(x(tm), y(v))));
  g.stroke();
  const [lt, lv] = pts[pts.length - 1];
  g.fillStyle = "#2563eb"; g.beginPath(); g.arc(x(lt), y(lv), 3.5, 0, 7); g.fill();
  setText($("chartvalue"), field + " = " + lv + " at " + new Date(lt).toLocaleTimeString());
}
window.addEventListener("resize", () => { chartDirty = true; });

// ---- publish form ---------------------------------------------------------------------
$("pubform").addEventListener("submit", (e) => {
  e.preventDefault();
  const topic = $("ptopic").value.trim();
  if (!topic || /[+#]/.test(topic)) return setText($("result"), "give one topic (no + or #)");
  const out = $("result");
  setText(out, "publishing…");
  publish(topic, $("ppayload").value, Number($("pqos").value), $("pretain").checked, (t, ok) => {
    out.className = ok ? "ok" : "no"; setText(out, t);
  });
});
$("pclear").addEventListener("click", () => {
  const topic = $("ptopic").value.trim(), out = $("result");
  if (!topic || /[+#]/.test(topic)) return setText(out, "give one topic (no + or #)");
  publish(topic, "", 1, true, (t, ok) => { out.className = ok ? "ok" : "no"; setText(out, ok ? "retained message cleared" : t); });
});

// Panels with nothing to report are marked, so a phone shows them as one short line.
function markEmpty() {
  for (const id of ["problems", "bridges", "plugs", "devices"]) {
    const el = $(id);
    const empty = id === "problems" ? el.textContent === "none reported" : el.rows.length === 1 && !!el.querySelector("tr.none");
    el.closest("section").classList.toggle("empty", empty);
  }
}

// ---- the tick ---------------------------------------------------------------------------
function tick() {
  const now = Date.now();
  markEmpty();
  if (info && everConnected) setText($("uptime"), connected ? "up " + ago(now - info.started * 1000) : "uptime unknown (offline)");
  if (!connected) banner();
  if (structureDirty && !overList && !selectionIn(list)) rebuild(now);
  else if (structureDirty) setText($("listnote"), "new topics wait until the pointer leaves the list");
  if (!structureDirty && $("listnote").textContent.startsWith("new topics")) setText($("listnote"), "");
  drawRows(now);
  if (chosen) {
    if (chartDirty) fillFields();
    detail(false);
  }
  if (chartDirty || chosen) { chart(now); chartDirty = false; }
  // Bridges' "down for" moves with the clock.
  for (const name of bridges.keys()) if (!bridges.get(name).connected) bridgeRow(name);
}
setInterval(() => {
  // One failure must not stop the page; the last one is kept for whoever looks (the tests).
  try { tick(); } catch (e) { window.__outpost.error = String(e && e.stack || e); }
}, TICK_MS);

// ---- measuring: long tasks and frame times, read by the tests -------------------------
try {
  new PerformanceObserver((l) => { for (const e of l.getEntries()) perf.longTasks.push([e.startTime, e.duration]); })
    .observe({ type: "longtask", buffered: true });
} catch (_) { /* not supported */ }
let lastFrame = 0;
(function frame(ts) {
  if (lastFrame) { perf.frames.push(ts - lastFrame); if (perf.frames.length > 2000) perf.frames.shift(); }
  lastFrame = ts;
  requestAnimationFrame(frame);
})();
