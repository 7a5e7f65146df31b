// vigil's operator page: inspect, review with feedback, model cards, live numbers.
// Plain JavaScript on the /v1 API; no framework, no build step.
"use strict";

const KEY_STORE = "vigil-api-key";
const state = { whoami: null, models: [], list: [], cursors: [], filters: {} };

// ---- small helpers -------------------------------------------------------------

// `replaceChildren` with nulls left out (it writes a null child as the text "null").
function put(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const when = (t) => new Date(t).toLocaleString();
const view = () => document.getElementById("view");

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class NetworkError extends Error {}

async function api(path, options = {}) {
  let res;
  try {
    res = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (e) {
    throw new NetworkError(String(e));
  }
  if (res.status === 401) {
    await askForKey(sessionStorage.getItem(KEY_STORE) ? "The key was refused." : "This server needs an API key.");
    return api(path, options);
  }
  if (!res.ok) {
    let code = "http_" + res.status, message = res.statusText;
    try {
      const body = await res.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) { /* not our JSON */ }
    throw new ApiError(res.status, code, message);
  }
  return res;
}
const getJson = async (path) => (await api(path)).json();

// Images under /v1 need the key when the server has keys: fetch them and use a blob URL.
// The newest ones are kept (three an inspection, for the 50 results the page keeps); older
// ones are freed, so a tab open all shift does not hold every heatmap it ever showed.
const blobUrls = new Map();
const KEPT_BLOBS = 160;
async function imageUrl(path) {
  if (!state.whoami || !state.whoami.keys_required) return path;
  if (!blobUrls.has(path)) {
    const blob = await (await api(path)).blob();
    blobUrls.set(path, URL.createObjectURL(blob));
    for (const [old, url] of blobUrls) {
      if (blobUrls.size <= KEPT_BLOBS) break;
      URL.revokeObjectURL(url);
      blobUrls.delete(old);
    }
  }
  return blobUrls.get(path);
}
function forgetBlobs() {
  for (const url of blobUrls.values()) URL.revokeObjectURL(url);
  blobUrls.clear();
}
// An image from the API; where it cannot be had (the model busy, the server away), a
// note saying so with a button to try again, instead of a broken image. `fallback`: a
// path to try once first when the image fails (a rendition the browser can show).
function authedImg(path, attrs = {}, fallback = null) {
  const img = h("img", attrs);
  const load = () => imageUrl(path).then((u) => { img.src = u; }).catch(failed);
  const failed = (e) => {
    if (fallback) {
      path = fallback;
      fallback = null;
      load();
      return;
    }
    const note = h("p", { class: "error" },
      `${attrs.alt || "image"} did not load` + (e ? `: ${errorBox(e).textContent}` : " (the server may be busy)") + " ",
      h("button", { type: "button", onclick: () => { note.replaceWith(img); img.removeAttribute("src"); load(); } }, "retry"));
    img.replaceWith(note);
  };
  // Without keys the browser fetches the URL itself: a 429 or 5xx arrives as an error.
  img.addEventListener("error", () => { if (img.getAttribute("src")) failed(null); });
  load();
  return img;
}

function errorBox(e) {
  // fetch() fails with a TypeError when the server cannot be reached at all.
  const text = e instanceof ApiError ? `${e.message} (${e.code})`
    : e instanceof NetworkError ? "cannot reach the server: is it running? (reload to retry)"
    : String(e);
  return h("p", { class: "error" }, text);
}

// ---- API key -------------------------------------------------------------------

function askForKey(message) {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-error").textContent = message || "";
  sessionStorage.removeItem(KEY_STORE);
  return new Promise((resolve) => {
    const form = document.getElementById("key-form");
    form.onsubmit = () => {
      sessionStorage.setItem(KEY_STORE, document.getElementById("key-input").value.trim());
      forgetBlobs();
      resolve();
    };
    // Esc would close the dialog and leave the page waiting for a key for good: the page
    // can show nothing without one.
    dialog.oncancel = (e) => e.preventDefault();
    // Some browsers let a second Esc close it anyway: open it again.
    dialog.onclose = () => { if (!sessionStorage.getItem(KEY_STORE)) dialog.showModal(); };
    if (!dialog.open) dialog.showModal();
  });
}

async function loadIdentity() {
  state.whoami = await getJson("/v1/whoami");
  const button = document.getElementById("key-button");
  button.hidden = !state.whoami.keys_required;
  button.textContent = `API key (${state.whoami.role})`;
  button.onclick = async () => { await askForKey(); await loadIdentity(); route(); };
  document.body.dataset.role = state.whoami.role;
}

// ---- live numbers --------------------------------------------------------------

async function refreshLive() {
  const el = document.getElementById("live");
  try {
    const st = await getJson("/v1/stats?window_s=60");
    const anomalous = Object.values(st.models).reduce((a, m) => a + m.anomalous, 0);
    el.replaceChildren(
      h("span", {}, h("b", {}, fmt(st.inspections_per_s, 2)), " insp/s"),
      h("span", {}, "p50 ", h("b", {}, fmt(st.latency_p50_ms, 1)), " ms"),
      h("span", {}, "p99 ", h("b", {}, fmt(st.latency_p99_ms, 1)), " ms"),
      h("span", {}, "anomalous ", h("b", {}, st.inspections ? `${Math.round((100 * anomalous) / st.inspections)}%` : "–")),
    );
    return st;
  } catch (e) {
    el.replaceChildren(h("span", { class: "error" }, "stats unavailable"));
  }
}

// ---- one inspection: image, heatmap over it, boxes, reconstruction -----------------

// `source`: a URL for the original image (a local blob for a fresh upload).
function inspectionFigure(insp, source) {
  const stack = h("div", { class: "stack" });
  const base = typeof source === "string" ? h("img", { src: source, alt: "image" }) : source;
  if (typeof source === "string" && insp.image_stored) {
    // The browser cannot show every format vigil reads (TIFF): then the server's PNG.
    base.addEventListener("error", () => {
      const png = authedImg(`${insp.links.image}?format=png`, { alt: "image" });
      png.classList.add("base");
      base.replaceWith(png);
    }, { once: true });
  }
  base.classList.add("base");
  stack.append(base);
  const heat = insp.image_stored
    ? authedImg(`${insp.links.heatmap}?opacity=1`, { class: "heat", alt: "heatmap" })
    : null;
  if (heat) {
    heat.style.opacity = 0.5;
    stack.append(heat);
  }
  for (const r of insp.regions) {
    stack.append(h("div", {
      class: "box",
      title: `peak ${fmt(r.peak)}, ${r.area_px} px`,
      style: `left:${(100 * r.x) / insp.width}%;top:${(100 * r.y) / insp.height}%;` +
        `width:${(100 * r.width) / insp.width}%;height:${(100 * r.height) / insp.height}%`,
    }));
  }
  const legend = heat ? heatLegend(insp.pixel_threshold) : null;
  const slider = heat
    ? h("label", { class: "opacity" }, "heatmap ",
        h("input", { type: "range", min: 0, max: 1, step: 0.05, value: 0.5,
          oninput: (e) => { heat.style.opacity = e.target.value; } }))
    : h("p", { class: "muted" }, "image not stored: no heatmap");
  const recon = insp.image_stored
    // Rebuilt at the model's square working size: shown at the image's own proportions.
    ? h("figure", {}, authedImg(insp.links.reconstruction, { class: "recon", alt: "reconstruction",
        style: `aspect-ratio: ${insp.width} / ${insp.height}` }),
        h("figcaption", {}, "reconstruction"))
    : null;
  return h("div", { class: "figure" }, h("figure", {}, stack, slider, legend), recon);
}

// What the heatmap's colours, outlines and boxes mean (the colour scale is fixed per
// model: 0 at blue, the pixel threshold in the middle, twice it at red).
function heatLegend(pixelThreshold) {
  const known = pixelThreshold !== undefined && pixelThreshold !== null;
  const tick = (label, x) => h("span", {}, known ? `${label} ${fmt(x)}` : label);
  return h("div", { class: "legend" },
    h("div", { class: "scale" }),
    h("div", { class: "ticks" }, h("span", {}, "0"), tick("pixel threshold", pixelThreshold), tick("2×", 2 * pixelThreshold)),
    h("p", { class: "muted" }, "white outlines: pixels over the pixel threshold · " +
      "boxes: the defect regions of an anomalous verdict"));
}

function verdictBadge(anomalous) {
  return h("span", { class: `verdict ${anomalous ? "bad" : "good"}` }, anomalous ? "anomalous" : "normal");
}

// The score on a bar whose middle is the threshold.
function scoreBar(score, threshold) {
  const pos = (x) => Math.max(0, Math.min(100, (50 * x) / (threshold || 1)));
  return h("div", { class: "bar", title: `score ${fmt(score)} / threshold ${fmt(threshold)}` },
    h("div", { class: "fill", style: `width:${pos(score)}%` }),
    h("div", { class: "mark", style: "left:50%" }));
}

// ---- Inspect -------------------------------------------------------------------

// `preferred`: the model to select (the one a training job just made), else the default.
async function showInspect(preferred) {
  const models = await getJson("/v1/models");
  state.models = models;
  const chosen = models.some((m) => m.name === preferred) ? preferred : (models.find((m) => m.is_default) || {}).name;
  const select = h("select", { id: "model-select" },
    models.map((m) => h("option", { value: m.name, selected: m.name === chosen }, `${m.name} (${m.architecture})`)));
  const thresholdOf = () => models.find((m) => m.name === select.value).image_threshold;
  const slider = h("input", { id: "threshold", type: "range", min: 0, step: "any", "aria-label": "threshold" });
  const sliderValue = h("output", {});
  const resetSlider = () => {
    const t = thresholdOf();
    slider.max = 2 * t;
    slider.value = t;
    sliderValue.textContent = fmt(t);
    slider.setAttribute("aria-valuetext", fmt(t));
  };
  // Kept across views: going to an inspection's page and back shows them again.
  const results = state.inspectResults || (state.inspectResults = h("div", { id: "results" }));
  // Re-judge the shown results of the selected model against the slider's threshold,
  // without re-uploading; the others keep their own model's threshold.
  // Through `state`, so that results still arriving for an earlier visit of this page
  // are judged by the controls on screen now.
  state.thresholdFor = (card) => (card.model === select.value ? Number(slider.value) : card.threshold);
  const rejudgeAll = () => {
    for (const card of results.children) {
      if (card.rejudge) card.rejudge(state.thresholdFor(card));
    }
  };
  resetSlider();
  rejudgeAll();
  select.onchange = () => { resetSlider(); rejudgeAll(); };
  slider.oninput = () => {
    sliderValue.textContent = fmt(slider.value);
    slider.setAttribute("aria-valuetext", fmt(slider.value));
    rejudgeAll();
  };
  const files = h("input", { id: "files", type: "file", accept: "image/*", multiple: true,
    onchange: () => {
      inspectFiles([...files.files], select.value, results);
      files.value = ""; // so that picking the same file again inspects it again
    } });
  // A label is not reachable with Tab: this one takes focus and opens the picker on Enter or Space.
  const pick = h("label", { class: "link", tabindex: 0, role: "button",
    onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); files.click(); } } }, "pick files", files);
  const drop = h("div", { class: "drop", id: "drop" }, "Drop images here, or ", pick);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    inspectFiles([...e.dataTransfer.files], select.value, results);
  });
  view().replaceChildren(
    h("h1", {}, "Inspect"),
    h("div", { class: "controls" },
      h("label", {}, "model ", select),
      h("label", {}, "threshold ", slider, " ", sliderValue)),
    drop, results);
}

// Results kept on the page (each holds its image, heatmap and reconstruction).
const KEPT_RESULTS = 50;

async function inspectFiles(list, model, results) {
  for (const file of list) {
    const card = h("article", { class: "result pending" }, h("p", {}, `${file.name}: inspecting…`));
    results.prepend(card);
    while (results.children.length > KEPT_RESULTS) {
      const old = results.lastElementChild;
      if (old.sourceUrl) URL.revokeObjectURL(old.sourceUrl);
      old.remove();
    }
    try {
      const res = await api(`/v1/models/${encodeURIComponent(model)}/inspect?store_image=true`, {
        method: "POST",
        headers: { "Content-Type": file.type || "application/octet-stream" },
        body: file,
      });
      const insp = await res.json();
      const verdict = h("span", {});
      const bar = h("div", {});
      const judged = h("span", { class: "score" });
      card.model = model;
      card.threshold = insp.threshold;
      card.dataset.id = insp.id;
      card.rejudge = (t) => {
        verdict.replaceChildren(verdictBadge(insp.score > t));
        bar.replaceChildren(scoreBar(insp.score, t));
        // A verdict at the slider's threshold is a preview: the record keeps the model's.
        judged.textContent = `${model} · score ${fmt(insp.score)} · model threshold ${fmt(insp.threshold)}` +
          (Math.abs(t - insp.threshold) > 1e-9 ? ` · preview at ${fmt(t)}` : "");
      };
      card.rejudge(state.thresholdFor(card));
      const t = insp.timings_ms;
      card.className = "result";
      put(card,
        h("header", {}, verdict, h("b", {}, file.name), judged,
          // The inspection's page moves through these results with ← →, newest first.
          h("a", { href: `#/inspections/${insp.id}`, onclick: () => {
            state.list = [...results.children].map((c) => c.dataset.id).filter(Boolean);
          } }, "review")),
        bar,
        inspectionFigure(insp, (card.sourceUrl = URL.createObjectURL(file))),
        // Defect regions over most of the image: more likely another surface, or another
        // light, than one large defect.
        insp.regions.reduce((a, r) => a + r.area_px, 0) > 0.5 * insp.width * insp.height
          ? h("p", { class: "error" }, "Most of the image scores as anomalous: is this the surface and the lighting " +
            `this model was trained on (${model})? Try another model, or train one on good images of it.`)
          : null,
        ...(insp.warnings || []).map((w) => h("p", { class: "error" }, w)),
        h("p", { class: "muted" },
          `${insp.regions.length} region(s) · decode ${fmt(t.decode, 1)} · queue ${fmt(t.queue, 1)} · ` +
          `model ${fmt(t.inference, 1)} · scoring ${fmt(t.scoring, 1)} · total ${fmt(t.total, 1)} ms`));
    } catch (e) {
      card.className = "result";
      card.replaceChildren(h("b", {}, file.name), errorBox(e));
    }
  }
}

// ---- Review --------------------------------------------------------------------

function listQuery(cursor) {
  const p = new URLSearchParams({ limit: "24" });
  for (const [k, v] of Object.entries(state.filters)) if (v) p.set(k, v);
  if (cursor) p.set("cursor", cursor);
  return `/v1/inspections?${p}`;
}

async function showReview() {
  if (!state.models.length) state.models = await getJson("/v1/models");
  const f = state.filters;
  // datetime-local inputs show local time; the API takes UTC.
  const localTime = (iso) => {
    if (!iso) return "";
    const d = new Date(iso);
    return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  };
  const form = h("form", { class: "controls", id: "filters" },
    h("label", {}, "model ", h("select", { name: "model" }, h("option", { value: "" }, "any"),
      state.models.map((m) => h("option", { value: m.name, selected: f.model === m.name }, m.name)))),
    h("label", {}, "verdict ", h("select", { name: "verdict" }, h("option", { value: "" }, "any"),
      ["anomalous", "normal"].map((v) => h("option", { value: v, selected: f.verdict === v }, v)))),
    h("label", {}, "label ", h("select", { name: "feedback" }, h("option", { value: "" }, "any"),
      [["good", "good"], ["defective", "defective"], ["none", "not labelled"]].map(([v, t]) =>
        h("option", { value: v, selected: f.feedback === v }, t)))),
    h("label", {}, "part id starts with ", h("input", { name: "part_prefix", value: f.part_prefix || "", size: 10 })),
    h("label", {}, "since ", h("input", { name: "since", type: "datetime-local", value: localTime(f.since) })),
    h("label", {}, "until ", h("input", { name: "until", type: "datetime-local", value: localTime(f.until) })),
    h("button", { type: "submit" }, "Filter"));
  form.onsubmit = (e) => {
    e.preventDefault();
    const d = new FormData(form);
    const iso = (v) => (v ? new Date(v).toISOString() : "");
    const filters = { model: d.get("model"), verdict: d.get("verdict"), feedback: d.get("feedback"),
      part_prefix: d.get("part_prefix").trim(),
      since: iso(d.get("since")), until: iso(d.get("until")) };
    // The filters live in the address, so a reload or a shared link shows the same list.
    const query = new URLSearchParams(Object.entries(filters).filter(([, v]) => v)).toString();
    const target = query ? `#/review?${query}` : "#/review";
    if (location.hash === target) {
      // The same filters: no hashchange comes, so start from the first page here.
      state.cursors = [];
      showReview();
    } else {
      location.hash = target;
    }
  };
  const grid = h("div", { class: "grid", id: "inspections" });
  const pager = h("div", { class: "pager" });
  view().replaceChildren(h("h1", {}, "Review"), form, grid, pager);
  try {
    const cursor = state.cursors[state.cursors.length - 1];
    const page = await getJson(listQuery(cursor));
    state.list = page.items.map((i) => i.id);
    if (!page.items.length) grid.append(h("p", { class: "muted" }, "No inspections match."));
    for (const insp of page.items) {
      grid.append(h("a", { class: "item", href: `#/inspections/${insp.id}`, "data-id": insp.id },
        insp.image_stored ? authedImg(insp.links.image, { alt: "", loading: "lazy" }, `${insp.links.image}?format=png`) : h("div", { class: "noimg" }, "not stored"),
        h("div", {}, verdictBadge(insp.is_anomalous), " ", fmt(insp.score),
          insp.feedback ? h("span", { class: `label ${insp.feedback}` }, insp.feedback) : null),
        h("div", { class: "muted" }, `${insp.model} · ${when(insp.created_at)}`,
          insp.part_id ? ` · ${insp.part_id}` : "")));
    }
    if (state.cursors.length) {
      pager.append(h("button", { onclick: () => { state.cursors.pop(); showReview(); } }, "← Newer"));
    }
    if (page.next_cursor) {
      pager.append(h("button", { onclick: () => { state.cursors.push(page.next_cursor); showReview(); } }, "Older →"));
    }
  } catch (e) {
    grid.replaceChildren(errorBox(e));
  }
}

async function showInspection(id) {
  const insp = await getJson(`/v1/inspections/${encodeURIComponent(id)}`);
  const at = state.list.indexOf(id);
  const go = (delta) => {
    const next = state.list[at + delta];
    if (at >= 0 && next) location.hash = `#/inspections/${next}`;
  };
  const labelText = h("span", { id: "label" }, insp.feedback ? h("span", { class: `label ${insp.feedback}` }, insp.feedback) : "not labelled");
  // The stored note is shown and sent again with a new label (a label without one
  // would clear it).
  const note = h("input", { id: "note", placeholder: "note (optional)", size: 30, value: insp.feedback_note });
  let current = insp.feedback;
  // A note edited after labelling is saved with the label again (on Enter or leaving the field).
  note.onchange = () => { if (current) label(current); };
  // Saves go one after another, so the last label asked for is the one stored (leaving
  // the note field saves before a label button's click does).
  let saving = Promise.resolve();
  const label = (which) => (saving = saving.then(() => saveLabel(which)));
  const saveLabel = async (which) => {
    try {
      const res = await api(`/v1/inspections/${encodeURIComponent(id)}/feedback`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ label: which, note: note.value || null }),
      });
      const updated = await res.json();
      current = updated.feedback;
      put(labelText, h("span", { class: `label ${updated.feedback}` }, updated.feedback),
        updated.feedback_note ? h("span", { class: "muted" }, " · note saved") : null);
    } catch (e) {
      labelText.replaceChildren(errorBox(e));
    }
  };
  const figure = insp.image_stored
    // A TIFF, which browsers do not show, as the server's PNG of it.
    ? inspectionFigure(insp, authedImg(insp.links.image, { alt: "image" }, `${insp.links.image}?format=png`))
    : h("p", { class: "muted" }, "The image of this inspection was not stored.");
  const rows = [
    ["model", `${insp.model} (${insp.model_version.slice(0, 12)})`],
    ["score / threshold", `${fmt(insp.score)} / ${fmt(insp.threshold)}`],
    ["time", when(insp.created_at)],
    ["size", `${insp.width} × ${insp.height}`],
    ["part", insp.part_id || "–"],
    ["regions", insp.regions.map((r) => `${r.width}×${r.height} at (${r.x}, ${r.y}), peak ${fmt(r.peak)}`).join("; ") || "none"],
    ["total time", `${fmt(insp.timings_ms.total, 1)} ms`],
  ];
  view().replaceChildren(
    h("h1", {}, "Inspection ", verdictBadge(insp.is_anomalous)),
    h("div", { class: "controls" },
      h("button", { onclick: () => go(-1), disabled: !(at > 0) }, "← newer"),
      h("button", { onclick: () => go(1), disabled: !(at >= 0 && at + 1 < state.list.length) }, "older →"),
      h("a", { href: state.reviewHash || "#/review" }, "back to the list")),
    scoreBar(insp.score, insp.threshold),
    ...(insp.warnings || []).map((w) => h("p", { class: "error warning" }, w)),
    // Above the figure, so that the buttons are on screen at 1366×768.
    h("div", { class: "controls feedback" },
      h("b", {}, "Feedback: "), labelText,
      h("button", { id: "label-good", onclick: () => label("good") }, "Good (g)"),
      h("button", { id: "label-defective", onclick: () => label("defective") }, "Defective (d)"),
      note),
    figure,
    h("table", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))),
    h("p", { class: "muted" }, "Keys: ← → move through the list, g good, d defective."));
  view().dataset.inspection = id;
  keyHandler = (e) => {
    if (e.target.matches("input, textarea, select")) return;
    // Ctrl+D bookmarks, Alt+D goes to the address bar: a browser's keys, not a label.
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "ArrowLeft") go(-1);
    else if (e.key === "ArrowRight") go(1);
    else if (e.key === "g") label("good");
    else if (e.key === "d") label("defective");
  };
}

// ---- Models --------------------------------------------------------------------

function lossCurve(points) {
  const W = 320, H = 120, pad = 4;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart loss", role: "img" });
  if (!points || points.length < 2) return svg;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const X = (x) => pad + ((W - 2 * pad) * (x - x0)) / (x1 - x0 || 1);
  const Y = (y) => H - pad - ((H - 2 * pad) * (y - y0)) / (y1 - y0 || 1);
  svg.append(s("polyline", { points: points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: "currentColor" }));
  const title = s("title");
  title.textContent = `loss ${fmt(ys[0])} → ${fmt(ys[ys.length - 1])} over ${x1} steps`;
  svg.append(title);
  return svg;
}

// The validation scores on one axis with the threshold: a histogram when the model
// lists every score, else their summary (min, p50–p95 box, max).
function validationChart(v, threshold) {
  const W = 320, H = 40;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart validation", role: "img" });
  if (!v) return svg;
  const top = Math.max(v.max, threshold) * 1.1 || 1;
  const X = (x) => 4 + ((W - 8) * x) / top;
  if (v.values && v.values.length) {
    const bins = new Array(32).fill(0);
    for (const x of v.values) bins[Math.min(31, Math.floor((32 * x) / top))] += 1;
    const most = Math.max(...bins);
    bins.forEach((n, i) => {
      if (n) svg.append(s("rect", { x: X((i * top) / 32), width: (W - 8) / 32 - 1, y: 38 - (34 * n) / most, height: (34 * n) / most, fill: "#9ab" }));
    });
    svg.append(s("line", { x1: X(threshold), x2: X(threshold), y1: 2, y2: 38, stroke: "#c22", "stroke-width": 2 }));
    const title = s("title");
    title.textContent = `${v.count} validation images; threshold ${fmt(threshold)}`;
    svg.append(title);
    return svg;
  }
  svg.append(s("line", { x1: X(v.min), x2: X(v.max), y1: 20, y2: 20, stroke: "currentColor" }));
  svg.append(s("rect", { x: X(v.p50), width: Math.max(1, X(v.p95) - X(v.p50)), y: 12, height: 16, fill: "#9ab" }));
  svg.append(s("line", { x1: X(threshold), x2: X(threshold), y1: 2, y2: 38, stroke: "#c22", "stroke-width": 2 }));
  const title = s("title");
  title.textContent = `${v.count} validation images: min ${fmt(v.min)}, median ${fmt(v.p50)}, p95 ${fmt(v.p95)}, max ${fmt(v.max)}; threshold ${fmt(threshold)}`;
  svg.append(title);
  return svg;
}

// `calibrated`: whether the model has the calibration scores drift is measured against.
function driftText(d, calibrated = true) {
  if (!d && !calibrated) return "no calibration scores in this model: `vigil calibrate` on good images adds them";
  if (!d) return "not enough recent good parts yet (30 needed)";
  return `${d.drifted ? "DRIFTED: " : ""}distance ${fmt(d.statistic, 2)} (significant above ${fmt(d.critical, 2)}) ` +
    `between ${d.recent} recent good parts and ${d.reference} calibration images`;
}

async function showModels() {
  const models = await getJson("/v1/models");
  const live = await getJson("/v1/stats?window_s=60");
  state.models = models;
  const cards = h("div", { class: "cards", id: "model-cards" });
  view().replaceChildren(h("h1", {}, "Models"), cards);
  for (const m of models) {
    const d = await getJson(`/v1/models/${encodeURIComponent(m.name)}`);
    const c = d.card, t = c.thresholds, tr = c.training || {}, fb = d.feedback;
    const reload = h("button", { class: "admin", onclick: async () => {
      try {
        await api(`/v1/models/${encodeURIComponent(m.name)}/reload`, { method: "POST" });
        showModels();
      } catch (e) { reload.after(errorBox(e)); }
    } }, "Reload from disk");
    cards.append(h("article", { class: "card model", "data-model": m.name },
      h("h2", {}, m.name, m.is_default ? h("span", { class: "muted" }, " (default)") : null),
      h("p", {}, `${c.architecture.name} · ${c.input.channels} channel(s) · ${c.input.working_size}² · ${d.device} · version ${d.version.slice(0, 12)}`),
      h("h3", {}, "Thresholds"),
      h("p", {}, `image ${fmt(t.image)}, pixel ${fmt(t.pixel)}: ` + (t.manual
        ? "the image threshold set by hand"
        : t.method === "min-area"
        ? `min-area: no region of ${t.min_defect_area} px or more in any of ${t.validation_images} good images`
        : `${t.method}` + (t.quantile !== undefined ? ` ${fmt(t.quantile, 2)}` : "") +
          ` of ${t.validation_images} good images` +
          (t.margin !== undefined ? `, × ${fmt(1 + t.margin, 2)} (margin ${fmt(t.margin, 2)})` : "")) +
        (t.set_by ? `; set by ${t.set_by}` : "")),
      h("figure", {}, validationChart(c.validation_scores, t.image),
        h("figcaption", {}, c.validation_scores
          ? `the calibration images' scores, from 0 (left) to ${fmt(Math.max(c.validation_scores.max, t.image) * 1.1)} (right); red: the image threshold`
          : "no calibration scores in this model")),
      h("h3", {}, "Training"),
      h("p", {}, `${tr.steps ?? "?"} steps of ${tr.batch_size ?? "?"}, ${fmt(tr.seconds, 0)} s on ${tr.device ?? "?"}, final loss ${fmt(tr.final_loss, 4)}`),
      h("figure", {}, lossCurve(tr.loss_curve),
        h("figcaption", {}, tr.loss_curve && tr.loss_curve.length > 1
          ? `training loss by step, ${fmt(tr.loss_curve[0][1], 4)} at step ${tr.loss_curve[0][0]} to ${fmt(tr.loss_curve[tr.loss_curve.length - 1][1], 4)} at ${tr.loss_curve[tr.loss_curve.length - 1][0]}`
          : "no loss curve recorded")),
      h("h3", {}, "Score drift"),
      h("p", { class: live.drift[m.name] && live.drift[m.name].drifted ? "error drift" : "drift" }, driftText(live.drift[m.name], !!(c.validation_scores && (c.validation_scores.values || []).length))),
      h("h3", {}, "Feedback"),
      h("p", {}, `${fb.labelled} labelled: ${fb.false_positives} false alarm(s), ${fb.false_negatives} miss(es)` +
        (fb.suggested_threshold !== null && fb.suggested_threshold !== undefined
          ? `; the labels suggest threshold ${fmt(fb.suggested_threshold)}` : "")),
      reload));
  }
}

// ---- Train ---------------------------------------------------------------------

// Reads a job's server-sent events through fetch (EventSource cannot send the API key).
async function followJob(id, onView) {
  const res = await api(`/v1/training-jobs/${encodeURIComponent(id)}/events`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const data = buf.slice(0, end).split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      buf = buf.slice(end + 2);
      if (data) onView(JSON.parse(data));
    }
  }
}

const finished = (status) => ["succeeded", "failed", "cancelled"].includes(status);

function jobRow(job) {
  const row = h("tr", { "data-job": job.id });
  const problem = h("span", {});
  const render = (v) => {
    const pct = v.steps ? Math.round((100 * v.step) / v.steps) : 0;
    const cancel = finished(v.status) ? null : h("button", { onclick: async () => {
      if (!confirm(`Cancel training ${v.model}? What it has learned so far is not kept.`)) return;
      try { await api(`/v1/training-jobs/${encodeURIComponent(v.id)}`, { method: "DELETE" }); } catch (e) { problem.replaceChildren(errorBox(e)); }
    } }, "Cancel");
    row.dataset.status = v.status;
    // A job read back from the record (another server process ran it) has no step count.
    const progress = v.steps ? [h("progress", { max: 100, value: pct }), ` ${v.step}/${v.steps}`] : "–";
    row.replaceChildren(
      h("td", {}, v.model),
      h("td", { class: `status ${v.status}` }, v.status),
      h("td", {}, progress),
      h("td", {}, v.loss === undefined ? "–" : fmt(v.loss, 4)),
      h("td", {}, v.eta_s === undefined ? "–" : `${Math.round(v.eta_s)} s`),
      h("td", { class: "muted" }, v.message || `${when(v.created_at)} · ${v.data}`),
      h("td", {}, cancel, problem,
        v.status === "succeeded" ? h("a", { class: "inspect-with", href: `#/inspect/${encodeURIComponent(v.model)}` }, "inspect with it") : null));
  };
  render(job);
  if (!finished(job.status)) {
    followJob(job.id, (v) => {
      render(v);
      if (v.status === "succeeded") state.models = [];
    }).then(() => {
      // The stream ended: after the job did, or (another replica's job) after one event.
      if (!finished(row.dataset.status)) problem.replaceChildren(h("span", { class: "muted" }, "no live progress here: reload to see how the job ended"));
    }).catch((e) => problem.replaceChildren(errorBox(e instanceof ApiError ? e : "lost the connection to the server: reload to see how the job ended")));
  }
  return row;
}

async function showTrain() {
  const jobs = h("tbody", { id: "jobs" });
  const message = h("p", {});
  const form = h("form", { id: "train-form", class: "card" },
    h("div", { class: "controls" },
      h("label", {}, "model name ", h("input", { name: "model", required: true, pattern: "[A-Za-z0-9_\\-][A-Za-z0-9_.\\-]*", maxlength: 64, placeholder: "e.g. pcb-top" })),
      h("label", {}, "family ", h("select", { name: "arch" },
        ["draem", "spatial", "vae", "usad", "adversarial", "bergmann"].map((a) => h("option", { value: a }, a)))),
      h("label", {}, "steps ", h("input", { name: "steps", type: "number", min: 1, placeholder: "default" }))),
    h("div", { class: "controls" },
      h("label", {}, "good images: a folder on the server ", h("input", { name: "folder", size: 40, placeholder: "/data/good-parts" })),
      h("label", {}, " or upload images or a zip ", h("input", { name: "images", type: "file", accept: "image/*,.zip", multiple: true }))),
    h("div", { class: "controls" },
      h("label", {}, "more options (JSON, `vigil train` flags) ", h("input", { name: "options", size: 40, placeholder: '{"size": 256}' })),
      h("button", { type: "submit" }, "Start training")),
    message);
  form.onsubmit = async (e) => {
    e.preventDefault();
    const d = new FormData(form);
    let options = {};
    try {
      options = d.get("options").trim() ? JSON.parse(d.get("options")) : {};
    } catch (err) {
      message.replaceChildren(errorBox(`more options: ${err.message}`));
      return;
    }
    if (options === null || typeof options !== "object" || Array.isArray(options)) {
      message.replaceChildren(errorBox('more options: a JSON object, e.g. {"size": 256}'));
      return;
    }
    if ("arch" in options && options.arch !== d.get("arch")) {
      message.replaceChildren(errorBox(`more options name the family ${JSON.stringify(options.arch)}, the menu ${d.get("arch")}: choose it in the menu`));
      return;
    }
    options.arch = d.get("arch");
    if (d.get("steps")) options.steps = Number(d.get("steps"));
    const files = form.querySelector("input[type=file]").files;
    const folder = (d.get("folder") || "").trim();
    if (!folder && !files.length) {
      message.replaceChildren(errorBox("name a folder of good images on the server, or upload images"));
      return;
    }
    if (folder && files.length) {
      message.replaceChildren(errorBox("either a folder on the server or uploaded images, not both"));
      return;
    }
    let init;
    if (files.length) {
      const body = new FormData();
      body.append("model", d.get("model"));
      body.append("options", JSON.stringify(options));
      for (const f of files) body.append("images", f, f.name);
      init = { method: "POST", body };
    } else {
      init = { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: d.get("model"), folder, options }) };
    }
    try {
      const job = await (await api("/v1/training-jobs", init)).json();
      message.replaceChildren(`queued: ${job.model}`);
      jobs.prepend(jobRow(job));
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
  };
  view().replaceChildren(h("h1", {}, "Train a model"),
    h("p", { class: "muted" }, "From good images only. One job trains at a time; inspection goes on meanwhile. " +
      "The model is calibrated, written into the models folder and served as soon as it is done."),
    form,
    h("table", { class: "jobs" },
      h("thead", {}, h("tr", {}, ["model", "status", "progress", "loss", "ETA", "", ""].map((t) => h("th", {}, t)))),
      jobs));
  for (const job of await getJson("/v1/training-jobs")) jobs.append(jobRow(job));
}

// ---- Home ----------------------------------------------------------------------

async function showHome() {
  const drawn = state.viewCount;
  const st = await refreshLive();
  // The page may have changed while the numbers were on their way.
  if (drawn !== state.viewCount) return;
  const models = st ? Object.entries(st.models) : [];
  put(view(),
    h("h1", {}, "vigil"),
    h("p", {}, "Inspect images, review the verdicts and label them, and see how each model was calibrated."),
    h("h2", {}, "This server, last 60 seconds"),
    st ? h("table", { id: "live-table" },
      h("tr", {}, h("th", {}, "inspections / s"), h("td", {}, fmt(st.inspections_per_s, 2))),
      h("tr", {}, h("th", {}, "latency p50 / p99"), h("td", {}, `${fmt(st.latency_p50_ms, 1)} / ${fmt(st.latency_p99_ms, 1)} ms`)),
      models.map(([name, m]) => h("tr", {}, h("th", {}, `${name}: anomaly rate`),
        h("td", {}, `${fmt(100 * m.anomaly_rate, 1)}% of ${m.inspections}`))),
      Object.entries(st.drift).map(([name, d]) => h("tr", {}, h("th", {}, `${name}: score drift`),
        h("td", { class: d.drifted ? "error" : "" }, driftText(d))))) : null,
    h("p", {}, h("a", { href: "#/inspect" }, "Inspect images →")));
}

// ---- routing -------------------------------------------------------------------

let keyHandler = null;
document.addEventListener("keydown", (e) => keyHandler && keyHandler(e));

async function route() {
  state.viewCount = (state.viewCount || 0) + 1;
  keyHandler = null;
  delete view().dataset.inspection;
  const [path, query] = location.hash.split("?");
  const [, name, arg] = path.split("/");
  if (name === "review") {
    // Only the filters the API takes: it refuses others, and an old link may carry one.
    const known = ["model", "verdict", "feedback", "part_id", "part_prefix", "request_id", "since", "until"];
    const filters = Object.fromEntries([...new URLSearchParams(query || "")].filter(([k]) => known.includes(k)));
    if (JSON.stringify(filters) !== JSON.stringify(state.filters)) state.cursors = [];
    state.filters = filters;
    state.reviewHash = location.hash;
  }
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    a.classList.toggle("active", a.dataset.view === name || (name === "inspections" && a.dataset.view === "review"));
  }
  try {
    if (name === "inspect") await showInspect(arg && decodeURIComponent(arg));
    else if (name === "review") await showReview();
    else if (name === "inspections" && arg) await showInspection(decodeURIComponent(arg));
    else if (name === "models") await showModels();
    else if (name === "train") await showTrain();
    else await showHome();
  } catch (e) {
    view().replaceChildren(errorBox(e));
  }
  document.body.dataset.ready = location.hash || "#/";
}

window.addEventListener("hashchange", route);
(async () => {
  try {
    await loadIdentity();
  } catch (e) {
    view().replaceChildren(errorBox(e));
    return;
  }
  await route();
  // The header's numbers every 5 s, and the home page's table with them.
  setInterval(() => (["", "#/", "#"].includes(location.hash) && document.getElementById("live-table") ? showHome() : refreshLive()), 5000);
  refreshLive();
})();
