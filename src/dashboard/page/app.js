// outpost dashboard: an MQTT 3.1.1 client of the gateway over WebSocket on /mqtt.
// Subscribes to "#" at QoS 0 (nothing to acknowledge) and renders what arrives.
"use strict";
const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder(), text = new TextDecoder();
let info = null;
const topics = new Map(); // topic -> { count, times: [ms], last }
let chosen = null;
const points = []; // [ms, value] of the charted topic

fetch("info.json").then((r) => r.json()).then((i) => {
  info = i;
  $("gw").textContent = "gateway " + i.gateway;
  $("version").textContent = "v" + i.version;
  $("listeners").innerHTML = "<tr><th>protocol</th><th>address</th></tr>" +
    i.listeners.map((l) => {
      // A wildcard bind is reached at the address this page came from.
      const url = l.url.replace(/\/\/(0\.0\.0\.0|\[::\])/, "//" + location.hostname);
      return `<tr><td>${esc(l.protocol)}</td><td><code>${esc(url)}</code></td></tr>`;
    }).join("");
});

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
}
function str(s) {
  const b = utf8.encode(s);
  return [b.length >> 8, b.length & 255, ...b];
}
function packet(type, body) {
  const len = [];
  let n = body.length;
  do {
    let d = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) d |= 128;
    len.push(d);
  } while (n > 0);
  return new Uint8Array([type, ...len, ...body]);
}

function login(user, pass) {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/mqtt";
  const ws = new WebSocket(url, "mqtt");
  ws.binaryType = "arraybuffer";
  let buf = new Uint8Array(0), ping = null;
  ws.onopen = () => {
    const id = "dashboard-" + Math.random().toString(16).slice(2, 10);
    let flags = 0x02;
    const body = [...str("MQTT"), 4, 0, 0, 30, ...str(id)];
    if (user) { flags |= 0x80; body.push(...str(user)); }
    if (pass) { flags |= 0x40; body.push(...str(pass)); }
    body[7] = flags;
    ws.send(packet(0x10, body));
  };
  ws.onmessage = (e) => {
    const more = new Uint8Array(e.data), all = new Uint8Array(buf.length + more.length);
    all.set(buf); all.set(more, buf.length);
    buf = all;
    for (;;) {
      let len = 0, mul = 1, i = 1;
      for (; i < buf.length && i < 5; i++) {
        len += (buf[i] & 127) * mul; mul *= 128;
        if (!(buf[i] & 128)) break;
      }
      if (i >= buf.length || buf.length < i + 1 + len) return;
      const h = buf[0], body = buf.subarray(i + 1, i + 1 + len);
      buf = buf.slice(i + 1 + len);
      handle(h, body, ws);
    }
  };
  ws.onclose = () => {
    clearInterval(ping);
    if ($("app").hidden) $("error").textContent ||= "connection closed";
    else $("conn").textContent = "disconnected: reload to log in again";
  };
  ping = setInterval(() => ws.readyState === 1 && ws.send(new Uint8Array([0xc0, 0])), 20000);
}

function handle(h, body, ws) {
  switch (h >> 4) {
    case 2: { // CONNACK
      if (body[1] !== 0) {
        $("error").textContent = body[1] === 4 || body[1] === 5 ? "wrong user or password" : "refused (code " + body[1] + ")";
        ws.close();
        return;
      }
      $("login").hidden = true; $("app").hidden = false;
      $("conn").textContent = "connected";
      ws.send(packet(0x82, [0, 1, ...str("#"), 0]));
      break;
    }
    case 3: { // PUBLISH (QoS 0 only: we subscribed at 0)
      const tl = (body[0] << 8) | body[1];
      const topic = text.decode(body.subarray(2, 2 + tl));
      const off = 2 + tl + (((h >> 1) & 3) ? 2 : 0);
      seen(topic, text.decode(body.subarray(off)));
      break;
    }
  }
}

function number(payload) {
  const n = Number(payload);
  if (payload.trim() !== "" && Number.isFinite(n)) return n;
  try {
    const j = JSON.parse(payload);
    for (const k of ["power_w", "value", "avg_w"]) if (typeof j[k] === "number") return j[k];
    for (const v of Object.values(j)) if (typeof v === "number") return v;
  } catch (_) { /* not JSON */ }
  return null;
}

function seen(topic, payload) {
  const now = Date.now();
  const t = topics.get(topic) || { count: 0, times: [], last: "" };
  t.count++; t.times.push(now); t.last = payload;
  topics.set(topic, t);
  if (topic === chosen) {
    const v = number(payload);
    if (v !== null) points.push([now, v]);
  }
  let m;
  if ((m = topic.match(/^outpost\/[^/]+\/bridges\/([^/]+)\/state$/))) panel("bridges", m[1], payload, bridgeRow);
  else if ((m = topic.match(/^outpost\/[^/]+\/devices\/([^/]+)\/state$/))) panel("devices", m[1], payload, deviceRow);
  else if ((m = topic.match(/^sensor\/([^/]+)\/live$/))) panel("plugs", m[1], payload, plugRow);
}

const panels = { bridges: new Map(), devices: new Map(), plugs: new Map() };
function panel(which, name, payload, row) {
  let j;
  try { j = JSON.parse(payload); } catch (_) { return; }
  panels[which].set(name, row(name, j));
  $(which).innerHTML = [...panels[which].values()].join("");
}
function bridgeRow(name, b) {
  const dropped = Object.values(b.dropped || {}).reduce((a, x) => a + x, 0);
  const age = b.oldest_age_s == null ? "-" : Math.round(b.oldest_age_s) + " s";
  return `<tr><td>${esc(name)}</td><td class="${b.connected ? "up" : "down"}">${b.connected ? "up" : "down"}</td>` +
    `<td>queued ${esc(b.queued)}</td><td>oldest ${esc(age)}</td><td>dropped ${esc(dropped)}</td></tr>`;
}
function deviceRow(name, state) {
  const d = state.counters || {};
  const rej = Object.values(d.rejected || {}).reduce((a, x) => a + x, 0);
  const seenAt = d.last_seen_ms ? new Date(d.last_seen_ms).toLocaleTimeString() : "never";
  return `<tr><td>${esc(name)}</td><td>last seen ${esc(seenAt)}</td><td>rejected ${esc(rej)}</td></tr>`;
}
function plugRow(name, p) {
  return `<tr><td>${esc(name)}</td><td>${esc(p.power_w ?? "-")} W</td><td>${esc(p.state ?? "")}</td></tr>`;
}

function render() {
  const now = Date.now(), f = $("filter").value.trim();
  // A tree: each level of a topic is a row once; a click on a branch folds it.
  const rows = [];
  let prev = [];
  for (const [topic, t] of [...topics.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
    t.times = t.times.filter((x) => now - x < 10000);
    if (f && !topic.includes(f)) continue;
    const levels = topic.split("/");
    let hidden = false;
    for (let d = 0; d < levels.length - 1; d++) {
      const prefix = levels.slice(0, d + 1).join("/");
      if (hidden) break;
      if (prev.slice(0, d + 1).join("/") !== prefix || prev.length <= d + 1) {
        rows.push(`<tr class="branch" data-prefix="${esc(prefix)}"><td style="padding-left:${d + 0.4}em">` +
          `${folded.has(prefix) ? "▸" : "▾"} ${esc(levels[d])}/</td><td></td><td></td><td></td></tr>`);
      }
      hidden = folded.has(prefix);
    }
    prev = levels;
    if (hidden) continue;
    const d = levels.length - 1;
    rows.push(`<tr class="pick${topic === chosen ? " chosen" : ""}" data-topic="${esc(topic)}" title="${esc(topic)}">` +
      `<td style="padding-left:${d + 0.4}em">${esc(levels[d])}</td>` +
      `<td>${(t.times.length / 10).toFixed(1)}</td><td>${t.count}</td><td class="payload">${esc(t.last.slice(0, 200))}</td></tr>`);
  }
  $("topics").tBodies[0].innerHTML = rows.join("");
  if (info) $("uptime").textContent = "up " + Math.round(now / 1000 - info.started) + " s";
  while (points.length && now - points[0][0] > 120000) points.shift();
  chart();
}
const folded = new Set();
$("topics").addEventListener("click", (e) => {
  const branch = e.target.closest("tr.branch");
  if (branch) {
    const p = branch.dataset.prefix;
    folded.has(p) ? folded.delete(p) : folded.add(p);
    render();
    return;
  }
  const tr = e.target.closest("tr.pick");
  if (!tr) return;
  chosen = tr.dataset.topic; points.length = 0;
  $("charted").textContent = chosen;
  const v = number(topics.get(chosen).last);
  if (v !== null) points.push([Date.now(), v]);
});

function chart() {
  const c = $("chart"), g = c.getContext("2d");
  c.width = c.clientWidth; c.height = c.clientHeight;
  g.clearRect(0, 0, c.width, c.height);
  if (!points.length) return;
  const vs = points.map((p) => p[1]), lo = Math.min(...vs), hi = Math.max(...vs), span = hi - lo || 1;
  const t0 = Date.now() - 120000;
  g.strokeStyle = "#2563eb"; g.lineWidth = 2; g.beginPath();
  points.forEach(([t, v], i) => {
    const x = ((t - t0) / 120000) * c.width, y = c.height - 10 - ((v - lo) / span) * (c.height - 20);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  // The newest value as a dot, so even a single reading shows.
  const [lt, lv] = points[points.length - 1];
  g.fillStyle = "#2563eb"; g.beginPath();
  g.arc(((lt - t0) / 120000) * c.width, c.height - 10 - ((lv - lo) / span) * (c.height - 20), 3, 0, 7);
  g.fill();
  g.fillStyle = "#222"; g.fillText(hi.toFixed(2), 4, 12); g.fillText(lo.toFixed(2), 4, c.height - 4);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  $("error").textContent = "";
  login($("user").value, $("pass").value);
});
setInterval(render, 500);
