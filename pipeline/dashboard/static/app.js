// vap dashboard: tiles fed by server-sent updates (api/updates). Every URL is relative, so the page works
// behind a reverse proxy under a path prefix. What each tile drew is kept in window.vapDashboard.drawn, so
// tests (and curious people) can check the overlay against the frame's detections.
"use strict";

(function () {
  const PALETTE = ["#ff3b30", "#ffcc00", "#34c759", "#5ac8fa", "#ff9500", "#af52de", "#ff2d55", "#a2845e"];
  const MAX_CANVAS_WIDTH = 640;
  const grid = document.getElementById("grid");
  const banner = document.getElementById("banner");
  const summary = document.getElementById("summary");
  const empty = document.getElementById("empty");
  const detail = document.getElementById("detail");
  const tiles = new Map();
  const api = { drawn: {}, updates: 0, streams: {}, connected: false, visible: new Set() };
  // Tiles off screen load no pictures: with 64 cameras a screen shows a handful, and a page that fetched
  // every picture of every camera would fall behind (and load the server) for nothing.
  const onScreen = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const id = entry.target.dataset.stream;
      if (entry.isIntersecting) api.visible.add(id); else api.visible.delete(id);
      const parts = tiles.get(id);
      if (entry.isIntersecting && parts && parts.view) render(parts, true);
    }
  }, { rootMargin: "100px" });
  window.vapDashboard = api;
  let clockOffset = 0;
  let staleAfter = 5;
  let broker = null;

  function colour(label) {
    let hash = 0;
    for (const char of String(label)) hash = (hash * 31 + char.charCodeAt(0)) >>> 0;
    return PALETTE[hash % PALETTE.length];
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function stat(parent, name, label) {
    const box = element("div");
    box.append(element("dt", "", label));
    const value = element("dd", name, "–");
    box.append(value);
    parent.append(box);
    return value;
  }

  function makeTile(id) {
    const tile = element("a", "tile");
    tile.href = "#stream=" + encodeURIComponent(id);
    tile.dataset.stream = id;
    const title = element("h2");
    title.append(element("span", "name", id), element("span", "worker", ""));
    const frame = element("div", "frame");
    const canvas = element("canvas");
    canvas.width = 320;
    canvas.height = 180;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", "Camera " + id + ": no picture yet");
    const note = element("p", "stale-note");
    note.hidden = true;
    frame.append(canvas, note);
    const stats = element("dl", "stats");
    const parts = {
      tile, canvas, note, title,
      worker: title.querySelector(".worker"),
      fps: stat(stats, "fps", "frames/s"),
      latency: stat(stats, "latency", "latency"),
      age: stat(stats, "age", "last message"),
      objects: stat(stats, "objects", "objects"),
      zones: element("ul", "zones"),
      view: null, shownKey: null, image: null, drawnSeq: 0,
    };
    tile.append(title, frame, stats, parts.zones);
    tiles.set(id, parts);
    onScreen.observe(tile);
    const ids = Array.from(tiles.keys()).sort();
    const next = ids[ids.indexOf(id) + 1];
    grid.insertBefore(tile, next ? tiles.get(next).tile : null);
    empty.hidden = true;
    return parts;
  }

  // Draws a picture (or a blank frame) with one frame's detections; returns what was drawn, in canvas pixels.
  function draw(canvas, image, overlay, maxWidth) {
    const sourceWidth = (overlay && overlay.width) || (image && image.naturalWidth) || 320;
    const sourceHeight = (overlay && overlay.height) || (image && image.naturalHeight) || 180;
    const width = Math.min(maxWidth, image ? image.naturalWidth : sourceWidth);
    const scale = width / sourceWidth;
    canvas.width = Math.round(width);
    canvas.height = Math.round(sourceHeight * scale);
    const context = canvas.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    if (image) context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const boxes = [];
    const zones = [];
    if (!overlay) return { scale, boxes, zones };
    // Canvas pixels per CSS pixel: captions and lines keep the same size on screen in a tile and in the
    // detail view.
    const ratio = canvas.clientWidth ? Math.max(1, canvas.width / canvas.clientWidth) : 1;
    drawZones(context, overlay.zones || [], scale, ratio, zones);
    const fontPx = Math.round(13 * ratio);
    context.lineWidth = 2 * ratio;
    context.font = "bold " + fontPx + "px system-ui, sans-serif";
    for (const detection of overlay.detections) {
      const [x1, y1, x2, y2] = detection.box.map((value) => value * scale);
      const stroke = colour(detection.label);
      context.strokeStyle = stroke;
      if (detection.outline && detection.outline.length > 2) {
        context.beginPath();
        detection.outline.forEach(([x, y], index) => {
          if (index === 0) context.moveTo(x * scale, y * scale);
          else context.lineTo(x * scale, y * scale);
        });
        context.closePath();
        context.globalAlpha = 0.6;
        context.stroke();
        context.globalAlpha = 1;
      }
      context.strokeRect(x1, y1, x2 - x1, y2 - y1);
      let caption = detection.label;
      if (detection.confidence !== null && detection.confidence !== undefined) {
        caption += " " + Number(detection.confidence).toFixed(2);
      }
      if (detection.track_id !== null && detection.track_id !== undefined) caption += " #" + detection.track_id;
      const textWidth = context.measureText(caption).width + 6 * ratio;
      const band = fontPx + 4 * ratio;
      const top = y1 >= band ? y1 - band : y1;
      context.fillStyle = stroke;
      context.fillRect(x1, top, textWidth, band);
      context.fillStyle = "#000";
      context.fillText(caption, x1 + 3 * ratio, top + fontPx);
      boxes.push({ label: detection.label, track_id: detection.track_id, x1, y1, x2, y2, source: detection.box });
    }
    return { scale, boxes, zones };
  }

  // Zones as dashed polygons, lines as dashed segments, each with its count at this very frame.
  function drawZones(context, list, scale, ratio, drawnZones) {
    context.save();
    context.setLineDash([6 * ratio, 4 * ratio]);
    context.lineWidth = 2 * ratio;
    context.font = "bold " + Math.round(12 * ratio) + "px system-ui, sans-serif";
    for (const zone of list) {
      const points = (zone.points || []).map(([x, y]) => [x * scale, y * scale]);
      if (points.length < 2) continue;
      context.strokeStyle = "rgba(255, 255, 255, 0.85)";
      context.beginPath();
      points.forEach(([x, y], index) => (index === 0 ? context.moveTo(x, y) : context.lineTo(x, y)));
      if (zone.kind === "zone") context.closePath();
      context.stroke();
      const caption = zone.id + ": " + zone.count + (zone.kind === "line" ? " crossed" : " inside");
      // Captioned at the lowest corner, away from the detection labels drawn above the boxes.
      const [x, bottom] = points.reduce((low, point) => (point[1] > low[1] ? point : low));
      const y = Math.max(0, bottom - 16 * ratio);
      context.fillStyle = "rgba(0, 0, 0, 0.7)";
      context.fillRect(x, y, context.measureText(caption).width + 6 * ratio, 16 * ratio);
      context.fillStyle = "#fff";
      context.fillText(caption, x + 3 * ratio, y + 12 * ratio);
      drawnZones.push({ id: zone.id, kind: zone.kind, count: zone.count, points });
    }
    context.restore();
  }

  function render(parts, force) {
    const view = parts.view;
    const picture = view.picture;
    const overlay = picture ? picture.overlay : view.overlay;
    const key = picture ? picture.url : (overlay ? "frame:" + overlay.frame_id + ":" + view.version : null);
    if (!api.visible.has(view.id) && !force) return;
    if (!force && key === parts.shownKey) return;
    parts.shownKey = key;
    const finish = (image) => {
      // A picture that loads after a newer one was asked for is still drawn if it is newer than the one on
      // screen: when loading takes longer than pictures come, the tile moves on rather than waiting forever.
      if (picture ? picture.seq <= parts.drawnSeq : parts.shownKey !== key) return;
      if (picture) parts.drawnSeq = picture.seq;
      parts.image = image;
      const result = draw(parts.canvas, image, overlay, MAX_CANVAS_WIDTH);
      const frameId = picture ? picture.frame_id : overlay ? overlay.frame_id : null;
      api.drawn[view.id] = {
        frame_id: frameId, picture: picture ? picture.url : null, overlay: Boolean(overlay), scale: result.scale,
        canvas: { width: parts.canvas.width, height: parts.canvas.height }, boxes: result.boxes, zones: result.zones,
      };
      const count = overlay ? overlay.detections.length : 0;
      parts.canvas.setAttribute("aria-label", "Camera " + view.id + ", frame " + frameId + ": " + count +
        " detection" + (count === 1 ? "" : "s") + (picture && !overlay ? " (no results for this picture)" : ""));
      if (detailId() === view.id) renderDetail();
    };
    if (picture) {
      const image = new Image();
      image.onload = () => finish(image);
      image.onerror = () => { if (parts.shownKey === key) parts.shownKey = null; }; // tried again next update
      image.src = picture.url;
    } else {
      finish(null);
    }
  }

  function formatAge(seconds) {
    if (seconds < 1) return "now";
    if (seconds < 120) return Math.round(seconds) + " s ago";
    return Math.round(seconds / 60) + " min ago";
  }

  function refreshAges() {
    const now = Date.now() / 1000 - clockOffset;
    let stale = 0;
    for (const parts of tiles.values()) {
      const view = parts.view;
      const age = view.received_at ? Math.max(0, now - view.received_at) : Infinity;
      const isStale = age > staleAfter;
      if (isStale) stale += 1;
      parts.tile.classList.toggle("stale", isStale);
      parts.note.hidden = !isStale;
      parts.note.textContent = Number.isFinite(age) ? "No frames for " + Math.round(age) + " s" : "No frames yet";
      parts.age.textContent = Number.isFinite(age) ? formatAge(age) : "–";
    }
    const count = tiles.size;
    let text = count + " camera" + (count === 1 ? "" : "s");
    if (stale) text += ", " + stale + " without frames";
    summary.textContent = text;
  }

  function updateTile(view) {
    const parts = tiles.get(view.id) || makeTile(view.id);
    const previous = parts.view && parts.view.picture;
    if (view.picture && !("overlay" in view.picture) && previous && previous.url === view.picture.url) {
      view.picture.overlay = previous.overlay; // sent once per picture
    }
    parts.view = view;
    api.streams[view.id] = view;
    parts.worker.textContent = view.worker ? "on " + view.worker : "";
    parts.fps.textContent = view.fps === null ? "–" : view.fps.toFixed(1);
    parts.latency.textContent = view.latency_ms === null ? "–" : Math.round(view.latency_ms) + " ms";
    const labels = Object.entries(view.labels || {}).map(([label, n]) => n + " " + label);
    parts.objects.textContent = labels.length ? labels.join(", ") : "none";
    parts.zones.replaceChildren(...(view.zones || []).map((zone) => {
      const item = element("li");
      const value = zone.kind === "line" ? zone.crossings : zone.inside;
      item.append(zone.id + ": ", element("b", "", String(value)), zone.kind === "line" ? " crossed" : " inside");
      return item;
    }));
    render(parts, false);
  }

  function showBanner() {
    let text = "";
    if (!api.connected) text = "Lost the connection to this dashboard's server; reconnecting…";
    else if (broker && broker.state === "unreachable") {
      text = "Kafka is unreachable" + (broker.for_s >= 1 ? " for " + Math.round(broker.for_s) + " s" : "") +
        " (" + broker.detail + "). Showing the last known state; reconnecting by itself.";
    } else if (broker && broker.state === "connecting") text = "Connecting to Kafka…";
    else if (broker && broker.detail) text = "Connected to Kafka, " + broker.detail + ".";
    banner.textContent = text;
    banner.hidden = !text;
    banner.dataset.state = broker ? broker.state : "unknown";
  }

  function apply(update) {
    clockOffset = Date.now() / 1000 - update.server_time;
    staleAfter = update.stale_after_s;
    broker = update.broker;
    for (const view of update.streams) updateTile(view);
    for (const id of update.removed) {
      const parts = tiles.get(id);
      if (parts) { parts.tile.remove(); tiles.delete(id); delete api.streams[id]; }
    }
    api.updates += 1;
    showBanner();
    refreshAges();
  }

  function detailId() {
    const match = /^#stream=(.+)$/.exec(location.hash);
    return match ? decodeURIComponent(match[1]) : null;
  }

  function sparkline(canvas, values) {
    const context = canvas.getContext("2d");
    canvas.width = canvas.clientWidth || 320;
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    if (values.length < 2) return;
    const top = Math.max(...values) * 1.1 || 1;
    context.strokeStyle = "#7cc4ff";
    context.lineWidth = 2;
    context.beginPath();
    values.forEach((value, index) => {
      const x = (index / (values.length - 1)) * canvas.width;
      const y = canvas.height - (value / top) * canvas.height;
      if (index === 0) context.moveTo(x, y); else context.lineTo(x, y);
    });
    context.stroke();
  }

  function renderDetail() {
    const id = detailId();
    const parts = id === null ? null : tiles.get(id);
    detail.hidden = !parts;
    if (!parts) return;
    const view = parts.view;
    document.getElementById("detail-title").textContent = id + (view.worker ? " on " + view.worker : "");
    const picture = view.picture;
    draw(document.getElementById("detail-canvas"), parts.image, picture ? picture.overlay : view.overlay, 1280);
    sparkline(document.getElementById("sparkline"), view.latency_history || []);
    const history = view.latency_history || [];
    const worst = history.length ? Math.max(...history) : null;
    document.getElementById("detail-stats").textContent = "Now " +
      (view.latency_ms === null ? "–" : Math.round(view.latency_ms) + " ms") +
      (worst === null ? "" : ", worst of the last " + history.length + " frames " + Math.round(worst) + " ms");
    const events = document.getElementById("detail-events");
    events.replaceChildren(...(view.events || []).map((event) => {
      const item = element("li");
      const when = event.at ? new Date(event.at).toLocaleTimeString() : "";
      item.append(when + " ", element("b", "", event.event + " " + event.zone_id),
        " " + (event.label || "") + (event.track_id !== null ? " #" + event.track_id : "") +
        (event.direction ? " (" + event.direction + ")" : ""));
      return item;
    }));
    if (!events.children.length) events.append(element("li", "", "None yet."));
  }

  function connect() {
    const source = new EventSource("api/updates");
    source.addEventListener("update", (message) => {
      api.connected = true;
      apply(JSON.parse(message.data));
    });
    source.addEventListener("error", () => {
      api.connected = false;
      showBanner();
    });
  }

  window.addEventListener("hashchange", renderDetail);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && detailId() !== null) location.hash = "";
  });
  setInterval(refreshAges, 1000);
  connect();
})();
