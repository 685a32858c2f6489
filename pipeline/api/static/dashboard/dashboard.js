// The live dashboard: reads GET v1/stream (server-sent events whose ids are store
// positions) and draws each section as the server sends it. No library, no build step.
//
// Signing in posts the token once to v1/session, which answers an HttpOnly session cookie
// (the page never keeps the token) and a CSRF token, sent as X-CSRF-Token with every
// POST. The stream is read with fetch, which sends the cookie (so would an EventSource),
// to see why a stream is refused and to set Last-Event-ID itself. The reader keeps
// the id of the last event it applied and reconnects with it as Last-Event-ID: the
// server resumes after that position, so nothing is missed or applied twice. Every
// update names the position it follows (`after`): one that does not follow the last id
// is counted as an anomaly and the stream is resumed from the last id.
"use strict";

(() => {
  const FEED_SIZE = 50;
  const SEVERITIES = ["info", "low", "medium", "high", "critical"];
  const LEVELS = ["critical", "high", "medium", "low"];

  const state = {
    csrf: null,
    lastId: null,
    stored: {},
    feed: [],
    sections: {},
    incidentsSeen: null,
    retryMs: 1000,
    failures: 0,
    controller: null,
    timer: null,
    anomalies: 0,
    updates: 0,
  };

  const $ = (id) => document.getElementById(id);

  // -- drawing helpers -------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child);
    return node;
  }

  function when(iso) {
    if (!iso) return "";
    const at = new Date(iso);
    return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
  }

  function timeEl(iso) {
    return el("time", { datetime: iso, text: when(iso) });
  }

  function badge(kind, text) {
    return el("span", { class: `badge ${kind}`, text: text || kind });
  }

  function notReady(target, what) {
    target.replaceChildren(el("li", { class: "small", text: `${what}: not ready (no projections process has created its tables yet)` }));
  }

  // -- sections --------------------------------------------------------------------------

  function drawIncidents(section) {
    const list = $("incidents");
    const levels = $("incident-levels");
    if (!section || !section.ready) { notReady(list, "Incidents"); levels.replaceChildren(); return; }
    const open = section.open_by_level || {};
    levels.replaceChildren(...LEVELS.map((level) =>
      el("span", { class: `badge ${level}`, "data-level": level, text: `${level}: ${open[level] || 0}` })));
    const seen = new Set(section.items.map((i) => i.incident_id));
    if (state.incidentsSeen) {
      const fresh = section.items.filter((i) => !state.incidentsSeen.has(i.incident_id));
      if (fresh.length) {
        $("announce").textContent = fresh.map((i) => `New ${i.level} incident: ${i.rule} in ${i.zone || "no zone"}`).join(". ");
      }
    }
    state.incidentsSeen = seen;
    if (!section.items.length) {
      list.replaceChildren(el("li", { class: "small", text: "No open incidents." }));
      return;
    }
    list.replaceChildren(...section.items.map((i) => el("li",
      { class: `incident ${i.level}`, "data-incident": i.incident_id, "data-rule": i.rule },
      el("h3", {}, badge(i.level), el("span", { text: i.rule }),
        el("span", { class: "muted", text: `${i.zone || "no zone"} · score ${i.score}` }),
        i.state !== "open" ? el("span", { class: "muted", text: `(${i.state} by ${i.acknowledged_by || "?"})` }) : null),
      el("p", { class: "small" }, "Opened ", timeEl(i.opened_at), ` · ${i.evidence.length} evidence`),
      el("p", { class: "reasons", text: (i.reasons || []).join(" · ") }),
      el("ul", { "aria-label": "Evidence" }, ...(i.evidence_shown || []).map((e) => el("li", {}, describe(e)))),
      evidenceFrames(i),
      i.state === "open" ? el("p", { class: "actions" },
        el("button", { type: "button", class: "secondary", "data-acknowledge": i.incident_id,
          "aria-label": `Acknowledge the ${i.level} incident ${i.rule} in ${i.zone || "no zone"}` }, "Acknowledge"),
        el("span", { class: "small", role: "status", "data-outcome": i.incident_id, text: outcomes.get(i.incident_id) || "" })) : null,
    )));
  }

  // -- evidence frames ---------------------------------------------------------------------
  //
  // An incident's analysed frames, as the evidence bucket keeps them, with their boxes
  // drawn. The stream's summaries carry no boxes: the incident's detail (GET
  // v1/incidents/{id}) lists its frames (boxes, kept / expired / pending, the image's
  // url), and each kept image is fetched like every other request of the page (the
  // session cookie) and drawn on a <canvas> (the page's policy allows images from this
  // host only, not blob: URLs). Details and images are kept between redraws; a detail
  // with frames still pending is asked again a few seconds later.

  const FRAMES_SHOWN = 4;
  const PENDING_AGAIN_MS = 3000;
  const frameDetails = new Map(); // incident id -> { key, at, frames, promise }
  const frameImages = new Map(); // image url -> Promise of an ImageBitmap (null: not shown)

  function evidenceFrames(incident) {
    const framed = (incident.evidence_shown || []).filter((e) => e.event === "FrameAnalyzed");
    if (!framed.length) return null;
    const box = el("div", { class: "evidence-frames", "data-frames-for": incident.incident_id, "aria-label": "Evidence frames", role: "group" });
    const key = `${incident.evidence.length}:${incident.updated_position}`;
    const known = frameDetails.get(incident.incident_id);
    const pending = known && known.frames && known.frames.some((f) => f.state === "pending");
    if (known && known.key === key && !(pending && Date.now() - known.at > PENDING_AGAIN_MS)) {
      if (known.frames) drawEvidenceFrames(box, incident.incident_id, known.frames);
      else box.append(el("p", { class: "small", text: "Loading the evidence frames…" }));
      return box;
    }
    box.append(el("p", { class: "small", text: "Loading the evidence frames…" }));
    loadFrameDetail(incident.incident_id, key);
    return box;
  }

  async function loadFrameDetail(id, key) {
    const entry = { key, at: Date.now(), frames: null };
    frameDetails.set(id, entry);
    let frames = [];
    try {
      const response = await fetch(`v1/incidents/${encodeURIComponent(id)}?events=false`, { cache: "no-store" });
      if (response.ok) frames = (await response.json()).frames || [];
      else entry.error = `the incident's frames could not be read (${response.status})`;
    } catch (error) {
      entry.error = "the API did not answer";
    }
    entry.frames = frames;
    entry.at = Date.now();
    if (entry.error) frameDetails.delete(id); // asked again at the next redraw
    const box = document.querySelector(`[data-frames-for="${CSS.escape(id)}"]`);
    if (box) drawEvidenceFrames(box, id, frames, entry.error);
    if (frames.some((f) => f.state === "pending")) {
      // Only this incident's frames are drawn again (the list keeps its focus).
      setTimeout(() => {
        if (frameDetails.get(id) !== entry || !state.csrf) return; // signed out: no more
        if (document.querySelector(`[data-frames-for="${CSS.escape(id)}"]`)) loadFrameDetail(id, key);
        else frameDetails.delete(id);
      }, PENDING_AGAIN_MS);
    }
  }

  function drawEvidenceFrames(box, id, frames, error) {
    const shown = frames.slice(-FRAMES_SHOWN);
    box.replaceChildren(...shown.map((f) => evidenceFrame(f)));
    if (frames.length > shown.length) box.append(el("p", { class: "small", text: `and ${frames.length - shown.length} earlier frame(s)` }));
    if (error) box.append(el("p", { class: "small", text: `Evidence frames: ${error}.` }));
  }

  function frameLabel(f) {
    const found = (f.detections || []).map((d) => `${d.label} ${d.confidence.toFixed(2)}`).join(", ");
    return `${f.camera} at ${when(f.captured_at)}: ${found || "nothing detected"}`;
  }

  function evidenceFrame(f) {
    const figure = el("figure", { class: "evidence-frame", "data-frame": f.event_id, "data-frame-state": f.state });
    const caption = el("figcaption", { class: "small", text: frameLabel(f) });
    if (f.state !== "kept" || !f.url) {
      const why = f.state === "expired" ? (f.detail || "frame expired before it was kept") : "being kept…";
      figure.append(el("div", { class: `frame-missing ${f.state}`, text: why }), caption);
      return figure;
    }
    const canvas = el("canvas", { class: "frame", width: f.width, height: f.height, role: "img", "aria-label": `Evidence frame: ${frameLabel(f)}` });
    figure.append(canvas, caption);
    const url = f.url.replace(/^\//, ""); // relative, as the page's other requests
    if (!frameImages.has(url)) frameImages.set(url, fetchImage(url));
    frameImages.get(url).then((image) => {
      if (image) drawBoxes(canvas, image, f);
      else {
        frameImages.delete(url); // asked again at the next redraw
        figure.dataset.frameState = "unavailable";
        canvas.replaceWith(el("div", { class: "frame-missing", text: "The image could not be read: trying again." }));
      }
    });
    return figure;
  }

  async function fetchImage(url) {
    try {
      const response = await fetch(url, { cache: "default" });
      if (!response.ok) return null;
      return await createImageBitmap(await response.blob());
    } catch (error) {
      return null;
    }
  }

  function drawBoxes(canvas, image, f) {
    const context = canvas.getContext("2d");
    const { width, height } = canvas;
    context.drawImage(image, 0, 0, width, height);
    const line = Math.max(2, Math.round(width / 150));
    const size = Math.max(14, Math.round(height / 11));
    context.lineWidth = line;
    context.font = `${size}px system-ui, sans-serif`;
    context.textBaseline = "top";
    for (const d of f.detections || []) {
      const [x1, y1, x2, y2] = d.box;
      context.strokeStyle = "#ffd166";
      context.strokeRect(x1, y1, Math.max(1, x2 - x1), Math.max(1, y2 - y1));
      const text = `${d.label} ${d.confidence.toFixed(2)}`;
      const y = y1 - size - 4 >= 0 ? y1 - size - 4 : y1 + line;
      context.fillStyle = "rgba(22, 24, 29, .75)";
      context.fillRect(x1, y, context.measureText(text).width + 8, size + 4);
      context.fillStyle = "#ffd166";
      context.fillText(text, x1 + 4, y + 2);
    }
    canvas.dataset.drawn = String((f.detections || []).length);
  }

  // What an acknowledgement answered, shown until the incident is drawn again.
  const outcomes = new Map();

  async function acknowledge(button) {
    const id = button.dataset.acknowledge;
    button.disabled = true;
    let text;
    try {
      const response = await fetch(`v1/incidents/${encodeURIComponent(id)}/acknowledge`, {
        method: "POST",
        headers: { "X-CSRF-Token": state.csrf, "Content-Type": "application/json" },
        body: JSON.stringify({ note: "acknowledged on the dashboard" }),
      });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) text = "Acknowledged: updating…";
      else if (answer.error === "forbidden") text = "This token cannot acknowledge (it lacks the operate scope).";
      else text = answer.detail || `Refused (${response.status}).`;
    } catch (error) {
      text = "The API did not answer: try again.";
    }
    outcomes.set(id, text);
    const shown = document.querySelector(`[data-outcome="${CSS.escape(id)}"]`);
    if (shown) shown.textContent = text;
    button.disabled = false;
  }

  function drawCameras(section) {
    const list = $("cameras");
    if (!section || !section.ready) { notReady(list, "Cameras"); return; }
    if (!section.items.length) { list.replaceChildren(el("li", { class: "small", text: "No frames yet." })); return; }
    list.replaceChildren(...section.items.map((c) => {
      const frame = c.last_frame;
      const hour = Object.entries(c.last_hour || {});
      const total = (c.minutes || []).reduce((a, b) => a + b, 0);
      return el("li", { class: "camera", "data-camera": c.camera },
        el("h3", { text: c.camera }),
        el("p", { class: "small" }, `${c.frames_analysed} analysed · ${c.frames_skipped} skipped · ${c.detections} detections`),
        frame ? drawFrame(c.camera, frame) : el("p", { class: "small", text: "No analysed frame yet." }),
        frame ? el("p", { class: "small" }, "Last frame ", timeEl(frame.captured_at)) : null,
        el("p", { class: "small", "data-last-hour": "" }, "Last hour: ",
          hour.length ? hour.map(([label, n]) => `${label} ${n}`).join(", ") : "no detections"),
        el("div", { class: "spark", role: "img", "aria-label": `${total} detections in the last hour, per minute` },
          ...[...(c.minutes || [])].reverse().map((n) => el("span", { "data-n": n }))),
      );
    }));
    // Heights set through the CSSOM: the page's policy allows no inline style attribute.
    for (const bars of list.querySelectorAll(".spark")) {
      const spans = bars.querySelectorAll("span");
      const peak = Math.max(1, ...[...spans].map((s) => Number(s.dataset.n)));
      for (const span of spans) span.style.height = `${(100 * Number(span.dataset.n)) / peak}%`;
    }
  }

  function drawFrame(camera, frame) {
    const found = frame.detections || [];
    const label = found.length
      ? `${camera} last frame: ${found.map((d) => `${d.label} ${d.confidence.toFixed(2)}`).join(", ")}`
      : `${camera} last frame: nothing detected`;
    const picture = svg("svg", { class: "frame", viewBox: `0 0 ${frame.width} ${frame.height}`, role: "img", "aria-label": label });
    for (const d of found) {
      const [x1, y1, x2, y2] = d.box;
      picture.append(svg("rect", { x: x1, y: y1, width: Math.max(1, x2 - x1), height: Math.max(1, y2 - y1) }));
      const text = svg("text", { x: x1 + 4, y: Math.max(20, y1 - 6) });
      text.textContent = `${d.label} ${d.confidence.toFixed(2)}`;
      picture.append(text);
    }
    return picture;
  }

  function drawSecurity(section) {
    const table = $("security-counts");
    const latest = $("security-latest");
    if (!section || !section.ready) { notReady(latest, "Security"); table.tBodies[0].replaceChildren(); return; }
    const zones = [...new Set(section.counts.map((r) => r.zone))].sort();
    const cell = {};
    for (const r of section.counts) cell[`${r.zone}\u0000${r.severity}`] = r.events;
    table.tHead.replaceChildren(el("tr", {}, el("th", { scope: "col", text: "Zone" }),
      ...SEVERITIES.map((s) => el("th", { scope: "col", class: "num", text: s }))));
    table.tBodies[0].replaceChildren(...(zones.length ? zones : []).map((zone) => el("tr", {},
      el("th", { scope: "row", text: zone || "(no zone)" }),
      ...SEVERITIES.map((s) => el("td", { class: "num", "data-zone": zone, "data-severity": s, text: cell[`${zone}\u0000${s}`] || 0 })))));
    latest.replaceChildren(...section.latest.map((e) => el("li", { class: "small" },
      badge(e.severity), ` ${e.kind} · ${e.source} · ${e.zone || "no zone"} · `, timeEl(e.occurred_at))));
  }

  function drawServices(section) {
    const body = $("services").tBodies[0];
    if (!section || !section.ready) { body.replaceChildren(el("tr", {}, el("td", { colspan: 4, text: "Not ready" }))); return; }
    $("service-totals").replaceChildren(...section.totals.map((t) => badge(t.status, `${t.status}: ${t.instances}`)));
    body.replaceChildren(...section.items.map((s) => el("tr", { "data-service": `${s.service}/${s.instance}` },
      el("td", { text: s.service }), el("td", { text: s.instance }),
      el("td", {}, badge(s.status)), el("td", {}, timeEl(s.since)))));
  }

  function drawLag(section) {
    const body = $("lag").tBodies[0];
    if (!section || !section.ready) { body.replaceChildren(el("tr", {}, el("td", { colspan: 5, text: "Not ready" }))); return; }
    body.replaceChildren(...section.views.map((v) => el("tr", { "data-view": v.view },
      el("td", { text: v.view }), el("td", { class: "num", text: v.position }),
      el("td", { class: "num", text: v.lag_events }), el("td", { class: "num", text: v.lag_seconds }),
      el("td", { text: v.state }))));
  }

  const DRAW = { incidents: drawIncidents, cameras: drawCameras, security: drawSecurity, services: drawServices, lag: drawLag };

  function describe(e) {
    if (e.kind) return `#${e.position} ${e.severity} ${e.kind} at ${e.source}${e.zone ? ` (${e.zone})` : ""}`;
    if (e.detections) {
      const found = e.detections.map((d) => `${d.label} ${d.confidence.toFixed(2)}`).join(", ");
      return `#${e.position} ${e.camera}: ${found || "nothing detected"}`;
    }
    if (e.status) return `#${e.position} ${e.service}/${e.instance} ${e.status}`;
    if (e.reason) return `#${e.position} ${e.camera} skipped (${e.reason})`;
    return `#${e.position} ${e.domain} ${e.event}${e.service ? ` from ${e.service}` : ""}`;
  }

  function drawFeed() {
    const total = Object.values(state.stored).reduce((a, b) => a + b, 0);
    $("stored").replaceChildren(
      el("span", { class: "badge info", id: "stored-total", "data-total": total, text: `${total} events` }),
      ...Object.entries(state.stored).sort().map(([domain, n]) =>
        el("span", { class: "badge low", "data-domain": domain, "data-count": n, text: `${domain}: ${n}` })));
    $("feed").replaceChildren(...[...state.feed].reverse().map((e) =>
      el("li", { "data-position": e.position }, el("span", { class: "pos", text: e.received_at ? new Date(e.received_at).toLocaleTimeString() : "" }), describe(e))));
  }

  // -- applying events -------------------------------------------------------------------

  function apply(kind, payload) {
    if (kind === "snapshot") {
      state.stored = {};
      state.feed = [];
    } else if (payload.after !== state.lastId) {
      // Never sent by a server that keeps its promise: resume from what we have.
      state.anomalies += 1;
      document.body.dataset.anomalies = String(state.anomalies);
      reconnect(0);
      return;
    }
    for (const [domain, n] of Object.entries(payload.stored || {})) state.stored[domain] = (state.stored[domain] || 0) + n;
    state.feed = [...state.feed, ...(payload.events || [])].slice(-FEED_SIZE);
    for (const [name, section] of Object.entries(payload.sections || {})) {
      state.sections[name] = section;
      if (DRAW[name]) DRAW[name](section);
    }
    state.lastId = payload.position;
    state.updates += 1;
    document.body.dataset.position = String(state.lastId);
    document.body.dataset.updates = String(state.updates);
    drawFeed();
    // The position changes with every event: kept out of the status, which is announced.
    $("position").textContent = `· store position ${state.lastId}`;
    setStatus("live", "Live");
  }

  function parseEvent(block) {
    const message = { event: "message", data: [], id: null, retry: null };
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") message.data.push(value);
      else if (field === "event") message.event = value;
      else if (field === "id") message.id = value;
      else if (field === "retry" && /^\d+$/.test(value)) message.retry = Number(value);
    }
    return message;
  }

  // -- the connection --------------------------------------------------------------------

  function setStatus(kind, text) {
    const status = $("status");
    status.dataset.state = kind;
    if (status.textContent !== text) status.textContent = text;
  }

  async function connect() {
    state.timer = null;
    const controller = new AbortController();
    state.controller = controller;
    const headers = { Accept: "text/event-stream" };
    if (state.lastId !== null) headers["Last-Event-ID"] = String(state.lastId);
    let response;
    try {
      response = await fetch("v1/stream", { headers, cache: "no-store", signal: controller.signal });
    } catch (error) {
      if (state.controller === controller) reconnect();
      return;
    }
    if (response.status === 401 || response.status === 403) {
      const answer = await response.json().catch(() => ({}));
      signedOut(answer.detail || `refused (${response.status})`);
      return;
    }
    if (!response.ok || !response.body) {
      if (state.controller === controller) reconnect();
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (message.retry !== null) state.retryMs = message.retry;
          if (!message.data.length || state.controller !== controller) continue;
          apply(message.event, JSON.parse(message.data.join("\n")));
          state.failures = 0;
        }
      }
    } catch (error) {
      // The connection broke: reconnect below.
    }
    if (state.controller === controller) reconnect();
  }

  function reconnect(delay) {
    if (state.controller) state.controller.abort();
    state.controller = null;
    if (state.timer) clearTimeout(state.timer);
    if (!state.csrf) return;
    const wait = delay !== undefined ? delay : Math.min(10000, state.retryMs * 2 ** state.failures);
    state.failures += 1;
    setStatus("reconnecting", `Reconnecting… (last position ${state.lastId ?? "none"})`);
    state.timer = setTimeout(connect, wait);
  }

  // -- signing in ------------------------------------------------------------------------

  // The session's CSRF token from an answer of v1/session; null, with the reason to
  // show, when the answer is a refusal.
  async function session(response) {
    const answer = await response.json().catch(() => ({}));
    if (response.ok) return { csrf: answer.csrf_token };
    return { csrf: null, reason: answer.detail || `refused (${response.status})` };
  }

  async function signIn(token) {
    let found;
    try {
      found = await session(await fetch("v1/session", { method: "POST", headers: { Authorization: `Bearer ${token}` } }));
      // The cookie is Secure: a browser keeps it from an https page or from localhost only.
      if (found.csrf && !(await fetch("v1/session", { cache: "no-store" })).ok) {
        found = { csrf: null, reason: "The browser did not keep the session cookie: open the dashboard over https." };
      }
    } catch (error) {
      found = { csrf: null, reason: "The API did not answer: try again." };
    }
    if (found.csrf) started(found.csrf);
    else signedOut(found.reason);
  }

  function started(csrf) {
    state.csrf = csrf;
    $("sign-in").hidden = true;
    $("board").hidden = false;
    $("sign-out").hidden = false;
    setStatus("connecting", "Connecting…");
    reconnect(0);
  }

  async function signOut() {
    // Answered before the form shows, so that its clearing cookie cannot land after a
    // new sign-in's.
    const headers = { "X-CSRF-Token": state.csrf || "" };
    await fetch("v1/session", { method: "DELETE", headers }).catch(() => null);
    signedOut("");
  }

  function signedOut(reason) {
    state.csrf = null;
    reconnect();
    state.lastId = null;
    $("board").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("sign-in-error").textContent = reason || "";
    $("position").textContent = "";
    setStatus("signed-out", "Not signed in");
    $("token").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      $("token").value = "";
      $("sign-in-error").textContent = "";
      if (token) signIn(token);
    });
    $("sign-out").addEventListener("click", signOut);
    $("incidents").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-acknowledge]");
      if (button) acknowledge(button);
    });
    $("token").focus();
    // A session this browser holds already (a reload) goes on without signing in.
    fetch("v1/session", { cache: "no-store" }).then(session).then((found) => {
      if (found.csrf && !state.csrf) started(found.csrf);
    }, () => null);
  });
})();
