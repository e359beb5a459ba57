// dask-fp map page: click a place -> similar places; label hits; refine; draw an area; classifier; export.
// State lives here (positives, negatives, area, mode); every request carries all of it (the server keeps none).
"use strict";

const state = { info: null, positives: [], negatives: [], area: null, hits: [], busy: false, view: "geo", pixSource: null,
                labelled: {} };  // uid -> GeoJSON feature of every labelled tile (outlined green / red)
const $ = (id) => document.getElementById(id);
const colours = { hit: "#e67e00", positive: "#1a9c3a", negative: "#d0312d", hover: "#1f5fd6" };

// ---------------------------------------------------------------- maps
const geoMap = L.map("map", { zoomControl: true }).setView([0, 0], 2);
const hoverLayer = L.geoJSON(null, { style: { color: colours.hover, weight: 1.5, dashArray: "4 3", fill: false }, interactive: false }).addTo(geoMap);
const hitsLayer = L.geoJSON(null, { style: styleFor, onEachFeature: bindRank }).addTo(geoMap);
const labelsLayer = L.geoJSON(null, { style: (f) => ({ ...styleFor(f), weight: 3, dashArray: null, fillOpacity: 0.2 }), interactive: false }).addTo(geoMap);
const drawn = new L.FeatureGroup().addTo(geoMap);
geoMap.addControl(new L.Control.Draw({
  draw: { polyline: false, circle: false, marker: false, circlemarker: false,
          rectangle: { shapeOptions: { color: "#6a3dc8" } }, polygon: { shapeOptions: { color: "#6a3dc8" } } },
  edit: { featureGroup: drawn, edit: false },
}));
geoMap.on(L.Draw.Event.CREATED, (e) => { drawn.clearLayers(); drawn.addLayer(e.layer); setArea(e.layer.toGeoJSON().geometry); });
geoMap.on(L.Draw.Event.DELETED, () => setArea(null));

let pixMap = null, pixHover = null, pixHits = null, pixLabels = null;
const pixToLatLng = (c) => L.latLng(-c[1], c[0]);

function styleFor(f) {
  const uid = f.properties.uid;
  const c = state.positives.includes(uid) ? colours.positive : state.negatives.includes(uid) ? colours.negative : colours.hit;
  return { color: c, weight: 2, fillOpacity: 0.08 };
}
function bindRank(f, layer) {
  if (f.properties.rank) layer.bindTooltip(String(f.properties.rank), { permanent: true, direction: "center", className: "rank-label" });
  layer.on("click", (e) => { L.DomEvent.stopPropagation(e); });
}

// ---------------------------------------------------------------- helpers
async function api(path, opts) {
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).detail || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}
function status(text, kind) { const s = $("status"); s.textContent = text; s.className = "status " + (kind || "idle"); }
function throttle(fn, ms) {
  let last = 0, timer = null, args = null;
  return (...a) => { args = a; const wait = ms - (Date.now() - last);
    if (wait <= 0) { last = Date.now(); fn(...args); } else if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(...args); }, wait); };
}
function request() {
  const body = { positives: state.positives, negatives: state.negatives, k: Number($("k").value) || 20,
                 area: state.area, mode: $("mode").value };
  if (body.mode === "classify") body.threshold = Number($("threshold").value);
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

// ---------------------------------------------------------------- hover grid and click
async function locate(query) {
  try { return await (await api("/api/locate?" + new URLSearchParams(query))).json(); } catch (_) { return null; }
}
const hoverGeo = throttle(async (ll) => {
  const f = await locate({ lon: ll.lng.toFixed(8), lat: ll.lat.toFixed(8) });
  hoverLayer.clearLayers(); if (f) hoverLayer.addData(f);
}, 120);
geoMap.on("mousemove", (e) => hoverGeo(e.latlng.wrap()));
geoMap.on("click", async (e) => {
  const ll = e.latlng.wrap();
  const f = await locate({ lon: ll.lng.toFixed(8), lat: ll.lat.toFixed(8) });
  if (!f) { status("No stored tile there: click inside an orthomosaic.", "error"); return; }
  newQuery(f);
});

function showPixelSource(src) {
  state.view = "pixel"; state.pixSource = src.index;
  $("map").hidden = true; $("pixmap").hidden = false;
  if (!pixMap) {
    pixMap = L.map("pixmap", { crs: L.CRS.Simple, minZoom: -6, maxZoom: 4 });
    pixHover = L.geoJSON(null, { coordsToLatLng: pixToLatLng, style: { color: colours.hover, weight: 1.5, dashArray: "4 3", fill: false }, interactive: false }).addTo(pixMap);
    pixHits = L.geoJSON(null, { coordsToLatLng: pixToLatLng, style: styleFor, onEachFeature: bindRank }).addTo(pixMap);
    pixLabels = L.geoJSON(null, { coordsToLatLng: pixToLatLng, style: (f) => ({ ...styleFor(f), weight: 3, fillOpacity: 0.2 }), interactive: false }).addTo(pixMap);
    const back = L.control({ position: "topright" });
    back.onAdd = () => { const b = L.DomUtil.create("button"); b.textContent = "back to map"; b.onclick = showGeo; return b; };
    back.addTo(pixMap);
    const where = (e) => ({ source: state.pixSource, row: (-e.latlng.lat).toFixed(2), col: e.latlng.lng.toFixed(2) });
    pixMap.on("mousemove", throttle(async (e) => { const f = await locate(where(e)); pixHover.clearLayers(); if (f) pixHover.addData(f); }, 120));
    pixMap.on("click", async (e) => { const f = await locate(where(e)); if (f) newQuery(f); else status("No stored tile there.", "error"); });
  }
  pixMap.eachLayer((l) => { if (l instanceof L.ImageOverlay) pixMap.removeLayer(l); });
  const [h, w] = src.shape, bounds = [[-h, 0], [0, w]];
  L.imageOverlay(`/api/sources/${src.index}/preview.png`, bounds).addTo(pixMap);
  pixMap.invalidateSize(); pixMap.fitBounds(bounds);
  drawHits();
}
function showGeo() { state.view = "geo"; $("pixmap").hidden = true; $("map").hidden = false; geoMap.invalidateSize(); }

// ---------------------------------------------------------------- search
function newQuery(f) {
  state.positives = [f.properties.uid]; state.negatives = []; state.labelled = { [f.properties.uid]: f };
  $("mode").value = "search"; drawLabels(); runSearch();
}
function setArea(geom) { state.area = geom; $("clear-area").disabled = !geom; if (state.positives.length) runSearch(); }

async function runSearch() {
  if (state.busy || !state.positives.length) return;
  state.busy = true; document.body.classList.add("busy");
  for (const b of ["refine", "export-geojson", "export-geoparquet"]) $(b).disabled = true;
  const t0 = performance.now();
  const tick = setInterval(() => status(`Searching ${state.info.tiles.toLocaleString()} tiles… ${((performance.now() - t0) / 1000).toFixed(1)} s`, "busy"), 100);
  status("Searching…", "busy");
  try {
    const res = await (await api("/api/search", request())).json();
    state.hits = res.hits.features;
    status(`${state.hits.length} hits in ${res.seconds.toFixed(2)} s (${res.mode === "classify" ? "classifier" : "nearest neighbours"}, ${res.method}).`, "done");
    showMethod(res.method, res.method_detail);
  } catch (err) {
    status("Search failed: " + err.message, "error");
  } finally {
    clearInterval(tick); state.busy = false; document.body.classList.remove("busy");
    for (const b of ["refine", "export-geojson", "export-geoparquet"]) $(b).disabled = !state.positives.length;
    drawHits(); drawLabels();
  }
}

const methodNames = { exact: "exact search", codes: "compact codes + exact re-rank", classifier: "classifier" };
function showMethod(method, detail) {
  const m = $("method"); m.dataset.method = method;
  m.textContent = `Method: ${methodNames[method] || method} — ${detail}.`;
}

function drawHits() {
  hitsLayer.clearLayers(); if (pixHits) pixHits.clearLayers();
  labelsLayer.clearLayers(); if (pixLabels) pixLabels.clearLayers();
  const labelled = [...state.positives, ...state.negatives].map((u) => state.labelled[u]).filter(Boolean);
  labelsLayer.addData(labelled.filter((f) => !f.properties.pixel));
  if (pixLabels) pixLabels.addData(labelled.filter((f) => f.properties.pixel && f.properties.source === state.pixSource));
  const geo = state.hits.filter((f) => !f.properties.pixel);
  hitsLayer.addData(geo);
  if (pixHits) pixHits.addData(state.hits.filter((f) => f.properties.pixel && f.properties.source === state.pixSource));
  const list = $("hits"); list.innerHTML = "";
  for (const f of state.hits) {
    const p = f.properties, li = document.createElement("li");
    li.dataset.uid = p.uid;
    if (state.positives.includes(p.uid)) li.className = "positive";
    if (state.negatives.includes(p.uid)) li.className = "negative";
    const img = document.createElement("img");
    img.src = `/api/thumbnails/${p.uid}.png`; img.alt = `hit ${p.rank}`; img.title = "fly to this hit";
    img.onclick = () => flyTo(f);
    const meta = document.createElement("div"); meta.className = "meta";
    const value = p.score !== null ? `score ${p.score.toFixed(3)}` : `distance ${p.distance.toPrecision(4)}`;
    meta.textContent = `#${p.rank}  ${value}`; meta.append(document.createElement("br"), `${p.name} (${p.wy},${p.wx})`);
    const good = document.createElement("button"); good.textContent = "+"; good.title = "mark as a good hit (positive)";
    good.className = "mark-positive"; good.onclick = () => mark(f, "positives");
    const bad = document.createElement("button"); bad.textContent = "−"; bad.title = "mark as a bad hit (negative)";
    bad.className = "mark-negative"; bad.onclick = () => mark(f, "negatives");
    li.append(img, meta, good, bad); list.append(li);
  }
}
function flyTo(f) {
  if (f.properties.pixel) {
    const src = state.info.sources.find((s) => s.index === f.properties.source);
    if (state.view !== "pixel" || state.pixSource !== src.index) showPixelSource(src);
    pixMap.flyToBounds(L.geoJSON(f, { coordsToLatLng: pixToLatLng }).getBounds(), { maxZoom: 1 });
  } else {
    showGeo(); geoMap.flyToBounds(L.geoJSON(f).getBounds(), { maxZoom: 19 });
  }
}
function mark(f, list) {
  const uid = f.properties.uid; state.labelled[uid] = f;
  const other = list === "positives" ? "negatives" : "positives";
  state[other] = state[other].filter((u) => u !== uid);
  if (!state[list].includes(uid)) state[list].push(uid);
  drawHits(); drawLabels(); hitsLayer.setStyle(styleFor);
}
function drawLabels() {
  const n = state.info.min_labels, ok = state.positives.length >= n && state.negatives.length >= n;
  $("labels").textContent = state.positives.length ? `${state.positives.length} positive, ${state.negatives.length} negative example(s)` +
    (ok ? " — classifier mode available." : ` — classifier mode needs ${n} of each.`) : "No examples yet.";
  $("mode").querySelector("option[value=classify]").disabled = !ok;
  if (!ok && $("mode").value === "classify") $("mode").value = "search";
  $("threshold-box").hidden = $("mode").value !== "classify";
}

async function exportAs(fmt) {
  status(`Exporting ${fmt}…`, "busy");
  try {
    const blob = await (await api(`/api/export/${fmt}`, request())).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = fmt === "geojson" ? "dask-fp-hits.geojson" : "dask-fp-hits.parquet";
    document.body.append(a); a.click(); a.remove();
    status(`Exported hits and labels as ${fmt}.`, "done");
  } catch (err) { status("Export failed: " + err.message, "error"); }
}

// ---------------------------------------------------------------- start
$("refine").onclick = runSearch;
$("clear-area").onclick = () => { drawn.clearLayers(); setArea(null); };
$("reset").onclick = () => { state.positives = []; state.negatives = []; state.labelled = {}; state.hits = []; drawn.clearLayers(); state.area = null; $("clear-area").disabled = true; drawHits(); drawLabels(); status("Click a place on the map to search for similar places."); };
$("mode").onchange = () => { drawLabels(); runSearch(); };
$("threshold").oninput = () => { $("threshold-value").textContent = Number($("threshold").value).toFixed(2); };
$("threshold").onchange = runSearch;
$("export-geojson").onclick = () => exportAs("geojson");
$("export-geoparquet").onclick = () => exportAs("geoparquet");

(async () => {
  const info = state.info = await (await api("/api/info")).json();
  $("store-line").textContent = `${info.store}: ${info.tiles.toLocaleString()} tiles of ${info.tile} px (stride ${info.stride}), ${info.model}`;
  if (info.dashboard) { $("dashboard").href = info.dashboard; $("dashboard").hidden = false; }
  $("method").textContent = `Searches: ${methodNames[info.method]}` + (info.index
    ? ` (compact-code index of ${info.index.rows.toLocaleString()} rows, ${info.index.bits} bits).` : " (no compact-code index).");
  const bounds = L.latLngBounds([]);
  for (const s of info.sources) {
    const li = document.createElement("li"), a = document.createElement("a");
    a.textContent = s.name; li.append(a, ` — ${s.tiles} tiles, ${s.crs || "no CRS (pixel view)"}`);
    if (s.bounds) {
      const b = L.latLngBounds([s.bounds[1], s.bounds[0]], [s.bounds[3], s.bounds[2]]); bounds.extend(b);
      L.tileLayer(`/api/tiles/${s.index}/{z}/{x}/{y}.png`, { bounds: b, maxZoom: 22, maxNativeZoom: 21, minZoom: 0 }).addTo(geoMap);
      a.onclick = () => { showGeo(); geoMap.fitBounds(b); };
    } else {
      a.onclick = () => showPixelSource(s);
    }
    $("sources").append(li);
  }
  if (bounds.isValid()) geoMap.fitBounds(bounds); else if (info.sources.length) showPixelSource(info.sources[0]);
  drawLabels();
  document.body.dataset.ready = "1";
})().catch((err) => status("Could not load the store: " + err.message, "error"));
