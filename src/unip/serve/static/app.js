// The page of `unip serve`: three tabs over the server's HTTP API (docs/serve.md). Plain DOM, no library, nothing
// from another site.
"use strict";

const PATTERN_COLOURS = {local: "#3b78c2", hybrid: "#e08a1e", global: "#3f9b5a"};
const POLL_MS = 250;
let MODELS = [];
let SERVER = {};

// ------------------------------------------------------------------------------------------------ helpers
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// replaceChildren without the nulls (optional parts left out).
function fill(node, ...children) { node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined)); }

class ApiError extends Error {
  constructor(message, status, body) { super(message); this.status = status; this.body = body; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(`the server does not answer (${err.message}); is unip serve still running?`, 0, {});
  }
  let body;
  try { body = await response.json(); } catch (err) { body = {error: `${response.status} ${response.statusText}`}; }
  if (!response.ok) throw new ApiError(body.error || response.statusText, response.status, body);
  return body;
}

// Queue a job (the form's upload) and follow it: onProgress(state) while it runs; resolves to its final state.
async function runJob(path, form, onStart, onProgress) {
  form.append("wait", "false");
  const started = await api(path, {method: "POST", body: form});
  if (onStart) onStart(started.job);
  for (;;) {
    const state = await api(`/api/jobs/${started.job}`);
    if (onProgress) onProgress(state);
    if (["done", "failed", "cancelled"].includes(state.status)) return state;
    await sleep(POLL_MS);
  }
}

function formatNumber(value, digits = 2) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function fillModels(select, preferred = 0) {
  select.replaceChildren(...MODELS.map((m, i) => el("option", {value: m.name, text: m.name,
                                                                 selected: i === preferred})));
}

function stemOf(name) { return name.replace(/\.[^.]*$/, ""); }

function setupDrop(zone, input, onFiles) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles([...event.dataTransfer.files]);
  });
  input.addEventListener("change", () => { onFiles([...input.files]); input.value = ""; });
}

// ------------------------------------------------------------------------------------------------ tabs
function showTab(name) {
  for (const button of document.querySelectorAll("nav button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
}

// ------------------------------------------------------------------------------------------------ one prediction
// A prediction's picture: the input (temperatures coloured, or the picture the model read) under the colour mask,
// whose opacity the slider sets.
function stage(result, frame) {
  const box = el("div", {class: "stage"});
  if (frame) {
    box.append(el("img", {class: "base", src: frame.overlay_url, alt: "annotated frame"}));
  } else {
    box.append(el("img", {class: "base", src: result.view_url, alt: "input"}),
               el("img", {class: "mask", src: result.color_url, alt: "mask"}));
  }
  applyOpacity(box);
  return box;
}

function applyOpacity(root = document) {
  const opacity = Number(document.getElementById("opacity").value) / 100;
  for (const mask of root.querySelectorAll(".mask")) mask.style.opacity = String(opacity);
}

function colourBar(scale) {
  const bar = el("div", {class: "colorbar"});
  const canvas = el("canvas", {width: 16, height: 200});
  const context = canvas.getContext("2d");
  const gradient = context.createLinearGradient(0, 200, 0, 0);
  scale.colors.forEach((colour, i) => gradient.addColorStop(i / (scale.colors.length - 1), colour));
  context.fillStyle = gradient;
  context.fillRect(0, 0, 16, 200);
  bar.append(el("span", {class: "high", text: `${formatNumber(scale.high, 1)} °C`}), canvas,
             el("span", {class: "low", text: `${formatNumber(scale.low, 1)} °C`}),
             el("span", {class: "extremes", text: `in the frame: ${formatNumber(scale.min, 1)} to ` +
                                                  `${formatNumber(scale.max, 1)} °C`}));
  return bar;
}

function legend(result, areas) {
  const present = areas.percent.map((p, i) => [p, i]).filter(([, i]) => areas.pixels[i] > 0).sort((a, b) => b[0] - a[0]);
  return el("ul", {class: "legend"}, present.map(([percent, i]) => el("li", {},
    swatch(result.palette[i]), `${result.classes[i]} ${formatNumber(percent, 1)} %`)));
}

function swatch(colour) {
  const box = el("span", {class: "swatch"});
  box.style.background = `rgb(${colour.join(",")})`;
  return box;
}

// The class table: one row per class, the columns of areas.json as it lists them (and IoU against a label map).
function classTable(result, areas) {
  const celsius = ["celsius_mean", "celsius_median", "celsius_min", "celsius_max"].filter((key) => key in areas);
  const head = ["id", "class", "pixels", "percent", ...celsius.map((k) => `°C ${k.slice(8)}`)];
  if (result.iou) head.push("IoU %");
  const rows = result.classes.map((name, i) => {
    const cells = [i, name, areas.pixels[i], areas.percent[i], ...celsius.map((k) => areas[k][i] === null ? "" : areas[k][i])];
    if (result.iou) cells.push(result.iou[i] === null ? "" : result.iou[i]);
    const row = el("tr", {class: areas.pixels[i] > 0 ? "present" : "absent"},
                   cells.map((value) => el("td", {text: String(value)})));
    row.children[1].prepend(swatch(result.palette[i]));
    return row;
  });
  return el("table", {class: "classes"}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {text: h})))),
            el("tbody", {}, rows));
}

function downloads(result) {
  const stem = stemOf(result.input);
  return el("p", {class: "downloads"}, "Download: ", Object.entries(result.downloads).map(([name, url]) =>
    el("a", {href: url, download: `${stem}_${name}`, text: name})));
}

function scores(result) {
  if (result.label_error) return el("p", {class: "error", text: `label map: ${result.label_error}`});
  if (!result.iou) return null;
  return el("p", {class: "scores", text: `against ${result.label}: mIoU ${formatNumber(result.mIoU)} %, mAcc ` +
                                         `${formatNumber(result.mAcc)} %, aAcc ${formatNumber(result.aAcc)} %`});
}

function renderImage(body, result) {
  const picture = el("div", {class: "picture"}, stage(result), result.thermal ? colourBar(result.thermal) : null);
  fill(body, el("div", {class: "view"}, picture, legend(result, result)), scores(result),
       classTable(result, result), downloads(result));
}

// A video: its annotated frames played back, the table of the frame shown.
function renderVideo(body, result) {
  const frames = result.frames;
  let index = 0;
  let timer = null;
  const image = el("img", {class: "base", src: frames[0].overlay_url, alt: "annotated frame"});
  const slider = el("input", {type: "range", min: 0, max: frames.length - 1, value: 0});
  const label = el("span", {class: "frame-label"});
  const table = el("div");
  const play = el("button", {text: "Play"});
  const show = (i) => {
    index = i;
    const frame = frames[i];
    image.src = frame.overlay_url;
    slider.value = String(i);
    label.textContent = `frame ${frame.frame} (${formatNumber(frame.time_s, 2)} s), ${i + 1} of ${frames.length}`;
    table.replaceChildren(classTable(result, frame));
  };
  const stop = () => { clearTimeout(timer); timer = null; play.textContent = "Play"; };
  const step = () => {
    if (index + 1 >= frames.length) { stop(); return; }
    const wait = Math.max(40, 1000 * ((frames[index + 1].time_s ?? 0) - (frames[index].time_s ?? 0)));
    show(index + 1);
    new Image().src = frames[Math.min(index + 1, frames.length - 1)].overlay_url;
    timer = setTimeout(step, wait);
  };
  play.addEventListener("click", () => {
    if (timer) { stop(); return; }
    if (index + 1 >= frames.length) show(0);
    play.textContent = "Pause";
    timer = setTimeout(step, 0);
  });
  slider.addEventListener("input", () => { stop(); show(Number(slider.value)); });
  show(0);
  fill(body, el("div", {class: "stage"}, image), el("p", {class: "player"}, play, slider, label),
       result.complete ? null : el("p", {class: "status", text: "cancelled: the frames done so far"}),
       table, downloads(result));
}

// One file through /api/predict, in a card of its own; returns the final job state.
async function predictInto(card, file, model, extra = {}) {
  const status = el("p", {class: "status", text: "uploading…"});
  const progress = el("progress", {max: 1, value: 0});
  const cancel = el("button", {class: "cancel", text: "Cancel", hidden: true});
  const body = el("div", {class: "body"});
  card.replaceChildren(card.firstChild, status, progress, cancel, body);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("checkpoint", model);
  for (const [key, value] of Object.entries(extra)) {
    if (value instanceof File) form.append(key, value, value.name); else form.append(key, value);
  }
  let state;
  try {
    state = await runJob("/api/predict", form, (job) => {
      card.dataset.job = job;
      cancel.addEventListener("click", () => api(`/api/jobs/${job}/cancel`, {method: "POST"}).catch(() => {}));
    }, (s) => {
      const {done, total} = s.progress;
      status.textContent = s.status === "queued" ? "waiting for the model…" :
                           total > 1 ? `${s.status}: frame ${done} of ${total}` : `${s.status}…`;
      progress.max = Math.max(total, 1);
      progress.value = done;
      cancel.hidden = !(s.status === "running" && total > 1);
    });
  } catch (err) {
    state = {status: "failed", error: err.message};
  }
  progress.remove();
  cancel.remove();
  card.dataset.status = state.status;
  if (state.status === "failed") {
    status.textContent = state.error;
    status.className = "error";
    return state;
  }
  const result = state.result;
  if (!result) { status.textContent = "cancelled before any frame was done"; return state; }
  status.textContent = `${result.checkpoint}: ${result.width ? `${result.width} × ${result.height} pixels, ` : ""}` +
                       `${result.frames ? `${result.frames.length} frames, ` : ""}${formatNumber(state.seconds, 2)} s`;
  if (result.frames) renderVideo(body, result); else renderImage(body, result);
  return state;
}

function card(container, title) {
  const box = el("article", {class: "card"}, el("h2", {text: title}));
  container.prepend(box);
  return box;
}

async function predictFiles(files) {
  const model = document.getElementById("predict-model").value;
  const every = document.getElementById("every").value || "1";
  const container = document.getElementById("predict-results");
  await Promise.all(files.map((file) => predictInto(card(container, file.name), file, model, {every})));
}

// ------------------------------------------------------------------------------------------------ attention
let ANALYSIS = null;
let QUERY = null;

async function analyzeFiles(files) {
  const status = document.getElementById("attention-status");
  const model = document.getElementById("attention-model").value;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  form.append("checkpoint", model);
  status.className = "status";
  status.textContent = `profiling ${files.length} frame(s)…`;
  let state;
  try {
    state = await runJob("/api/analyze", form, null, (s) => { status.textContent = `${s.status}…`; });
  } catch (err) {
    state = {status: "failed", error: err.message};
  }
  if (state.status !== "done") {
    status.className = "error";
    status.textContent = state.error || state.status;
    return;
  }
  ANALYSIS = state.result;
  QUERY = null;
  const result = ANALYSIS;
  status.textContent = `${result.checkpoint}: ${result.num_images} frame(s) at ${result.input_size[1]} × ` +
                       `${result.input_size[0]}, ${result.depth} layers` +
                       (result.skipped.length ? `; could not read ${result.skipped.join(", ")}` : "");
  document.getElementById("attention-result").hidden = false;
  drawProfile("profile-nmi", result, "nmi", [result.thresholds.nmi_global, result.thresholds.nmi_local]);
  drawProfile("profile-distance", result, "distance", [result.thresholds.local_distance * result.uniform_distance]);
  const selected = result.layers.find((l) => l.layer === result.selected_layer);
  document.getElementById("selection").textContent = `Layer to distil: ${result.selected_layer} of ` +
    `${result.depth} (${result.selected_pattern}; ${result.selection_reason}); NMI ${formatNumber(selected.nmi, 3)}, ` +
    `distance ${formatNumber(selected.distance, 1)} px.`;
  layerTable(result);
  const layer = document.getElementById("layer");
  layer.replaceChildren(...result.layers.map((l) => el("option", {value: l.layer, selected: l.layer === result.selected_layer,
    text: `${l.layer} (${l.pattern}${l.layer === result.selected_layer ? ", distil" : ""})`})));
  fillHeads();
  document.getElementById("thumbs").replaceChildren(...result.frames.map((frame) =>
    el("img", {src: frame.image_url, alt: frame.name, title: frame.name, "data-index": frame.index,
               onclick: () => showFrame(frame.index)})));
  showFrame(0);
}

function fillHeads() {
  const layer = Number(document.getElementById("layer").value);
  const heads = ANALYSIS.layers.find((l) => l.layer === layer).heads;
  const head = document.getElementById("head");
  const chosen = head.value;
  head.replaceChildren(el("option", {value: "mean", text: "mean of heads"}),
                       ...Array.from({length: heads}, (_, h) => el("option", {value: h, text: `head ${h}`})));
  head.value = [...head.options].some((o) => o.value === chosen) ? chosen : "mean";
}

function showFrame(index) {
  const frame = ANALYSIS.frames[index];
  document.getElementById("attention-image").src = frame.image_url;
  document.getElementById("attention-frame").dataset.frame = index;
  for (const thumb of document.querySelectorAll("#thumbs img")) {
    thumb.classList.toggle("chosen", Number(thumb.dataset.index) === index);
  }
  const canvas = document.getElementById("attention-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  if (QUERY) queryAttention(QUERY.x, QUERY.y);
}

async function queryAttention(x, y) {
  QUERY = {x, y};
  const frame = document.getElementById("attention-frame").dataset.frame;
  const layer = document.getElementById("layer").value;
  const head = document.getElementById("head").value;
  const info = document.getElementById("attention-info");
  const params = new URLSearchParams({frame, layer, head, x, y});
  try {
    const map = await api(`${ANALYSIS.attention_url}?${params}`);
    drawAttention(map);
    let best = 0;
    map.values.forEach((v, i) => { if (v > map.values[best]) best = i; });
    info.className = "status";
    info.textContent = `layer ${map.layer}, ${map.head === null ? "mean of heads" : `head ${map.head}`}: patch ` +
      `(row ${map.row}, column ${map.col}) looks most at (row ${Math.floor(best / map.cols)}, column ` +
      `${best % map.cols}), ${formatNumber(100 * map.values[best], 1)} % of its attention`;
    document.getElementById("attention-frame").dataset.queried = `${map.layer}:${map.head}:${map.row}:${map.col}`;
  } catch (err) {
    info.className = "error";
    info.textContent = err.message;
  }
}

function drawAttention(map) {
  const image = document.getElementById("attention-image");
  const canvas = document.getElementById("attention-canvas");
  canvas.width = image.clientWidth;
  canvas.height = image.clientHeight;
  const context = canvas.getContext("2d");
  const w = canvas.width / map.cols;
  const h = canvas.height / map.rows;
  const top = Math.max(...map.values) || 1;
  context.clearRect(0, 0, canvas.width, canvas.height);
  map.values.forEach((value, i) => {
    context.fillStyle = `rgba(255, 60, 0, ${(0.7 * value / top).toFixed(3)})`;
    context.fillRect((i % map.cols) * w, Math.floor(i / map.cols) * h, w, h);
  });
  context.strokeStyle = "#00e0ff";
  context.lineWidth = 2;
  context.strokeRect(map.col * w + 1, map.row * h + 1, w - 2, h - 2);
}

// A line chart of one metric against depth: each layer a dot in its pattern's colour, the layer to distil a star,
// the thresholds dashed.
function drawProfile(id, result, metric, thresholds) {
  const chart = document.getElementById(id);
  const width = 420;
  const height = 220;
  const pad = {left: 48, right: 12, top: 12, bottom: 30};
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.replaceChildren();
  const values = result.layers.map((l) => l[metric]);
  const high = Math.max(...values, ...thresholds) * 1.1 || 1;
  const layers = result.layers.map((l) => l.layer);
  const first = Math.min(...layers);
  const last = Math.max(...layers);
  const x = (layer) => pad.left + (last === first ? 0.5 : (layer - first) / (last - first)) * (width - pad.left - pad.right);
  const y = (value) => height - pad.bottom - (value / high) * (height - pad.top - pad.bottom);
  chart.append(svg("line", {x1: pad.left, y1: y(0), x2: width - pad.right, y2: y(0), class: "axis"}),
               svg("line", {x1: pad.left, y1: pad.top, x2: pad.left, y2: y(0), class: "axis"}));
  for (const tick of [0, high / 2, high]) {
    const text = svg("text", {x: pad.left - 6, y: y(tick) + 4, "text-anchor": "end", class: "tick"});
    text.textContent = metric === "nmi" ? tick.toFixed(2) : tick.toFixed(0);
    chart.append(text);
  }
  for (const layer of layers) {
    const text = svg("text", {x: x(layer), y: height - 10, "text-anchor": "middle", class: "tick"});
    text.textContent = String(layer);
    chart.append(text);
  }
  for (const threshold of thresholds) {
    chart.append(svg("line", {x1: pad.left, y1: y(threshold), x2: width - pad.right, y2: y(threshold), class: "threshold"}));
  }
  chart.append(svg("polyline", {points: result.layers.map((l) => `${x(l.layer)},${y(l[metric])}`).join(" "),
                                class: "profile-line"}));
  for (const l of result.layers) {
    const dot = svg("circle", {cx: x(l.layer), cy: y(l[metric]), r: 5, fill: PATTERN_COLOURS[l.pattern],
                               class: `point ${l.pattern}`, "data-layer": l.layer});
    const title = svg("title");
    title.textContent = `layer ${l.layer}: ${l.pattern}, ${metric} ${Number(l[metric]).toFixed(3)}`;
    dot.append(title);
    chart.append(dot);
    if (l.layer === result.selected_layer) {
      const star = svg("text", {x: x(l.layer), y: y(l[metric]) - 9, "text-anchor": "middle", class: "star"});
      star.textContent = "★";
      chart.append(star);
    }
  }
}

function layerTable(result) {
  const table = document.getElementById("layers");
  const head = el("tr", {}, ["layer", "heads", "NMI", "distance (px)", "entropy", "pattern"].map((h) => el("th", {text: h})));
  const rows = result.layers.map((l) => el("tr", {class: l.layer === result.selected_layer ? "selected" : ""},
    [l.layer, l.heads, formatNumber(l.nmi, 4), formatNumber(l.distance, 2), formatNumber(l.entropy, 4),
     l.pattern + (l.layer === result.selected_layer ? " (distil)" : "")].map((v) => el("td", {text: String(v)}))));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

function clickAttention(event) {
  if (!ANALYSIS) return;
  const image = document.getElementById("attention-image");
  const box = image.getBoundingClientRect();
  const [height, width] = ANALYSIS.input_size;
  const x = Math.min(width - 1, Math.max(0, Math.floor((event.clientX - box.left) / box.width * width)));
  const y = Math.min(height - 1, Math.max(0, Math.floor((event.clientY - box.top) / box.height * height)));
  queryAttention(x, y);
}

// ------------------------------------------------------------------------------------------------ compare
const LABELS = new Map();
const COMPARED = [];

function labelFor(name) {
  const stem = stemOf(name);
  for (const [labelName, file] of LABELS) {
    const labelStem = stemOf(labelName);
    if (labelStem === stem || labelStem.startsWith(`${stem}_`) || labelStem.startsWith(`${stem}.`)) return file;
  }
  return LABELS.size === 1 && COMPARED.length <= 1 ? [...LABELS.values()][0] : null;
}

async function compareOne(entry) {
  const [a, b] = ["compare-a", "compare-b"].map((id) => document.getElementById(id).value);
  const label = labelFor(entry.file.name);
  entry.label = label;
  const columns = [a, b].map((model) => el("div", {class: "side"}, el("h3", {text: model})));
  entry.card.replaceChildren(el("h2", {text: entry.file.name + (label ? ` (label map ${label.name})` : "")}),
                             el("div", {class: "sides"}, columns));
  await Promise.all([a, b].map((model, i) => {
    const inner = el("div", {class: "card-inner"}, el("span"));
    columns[i].append(inner);
    return predictInto(inner, entry.file, model, label ? {label} : {});
  }));
}

async function compareFiles(files) {
  const container = document.getElementById("compare-results");
  const entries = files.map((file) => ({file, card: card(container, file.name), label: null}));
  COMPARED.push(...entries);
  await Promise.all(entries.map(compareOne));
}

function addLabels(files) {
  for (const file of files) LABELS.set(file.name, file);
  document.getElementById("compare-label-names").textContent = `label maps: ${[...LABELS.keys()].join(", ")}`;
  for (const entry of COMPARED) {
    if (!entry.label && labelFor(entry.file.name)) compareOne(entry);
  }
}

// ------------------------------------------------------------------------------------------------ start
async function start() {
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  try {
    const info = await api("/api/models");
    MODELS = info.models;
    SERVER = info;
  } catch (err) {
    const error = document.getElementById("page-error");
    error.hidden = false;
    error.textContent = err.message;
    return;
  }
  fillModels(document.getElementById("predict-model"));
  fillModels(document.getElementById("attention-model"));
  fillModels(document.getElementById("compare-a"), 0);
  fillModels(document.getElementById("compare-b"), Math.min(1, MODELS.length - 1));
  document.getElementById("every").value = SERVER.every;
  document.getElementById("server").textContent = `${MODELS.map((m) => m.name).join(", ")} · uploads up to ` +
    `${Math.round(SERVER.max_upload_bytes / 1048576)} MiB`;
  document.getElementById("predict-kinds").textContent = Object.values(SERVER.predict_kinds).join("; ");
  document.getElementById("compare-note").textContent = MODELS.length > 1 ? "" :
    "Only one checkpoint is served: start unip serve with --checkpoint A --checkpoint B to compare two.";
  document.getElementById("opacity").addEventListener("input", () => applyOpacity());
  document.getElementById("layer").addEventListener("change", () => { fillHeads(); if (QUERY) queryAttention(QUERY.x, QUERY.y); });
  document.getElementById("head").addEventListener("change", () => { if (QUERY) queryAttention(QUERY.x, QUERY.y); });
  document.getElementById("attention-frame").addEventListener("click", clickAttention);
  setupDrop(document.getElementById("predict-drop"), document.getElementById("predict-files"), predictFiles);
  setupDrop(document.getElementById("attention-drop"), document.getElementById("attention-files"), analyzeFiles);
  setupDrop(document.getElementById("compare-drop"), document.getElementById("compare-files"), compareFiles);
  setupDrop(document.getElementById("compare-label-drop"), document.getElementById("compare-labels"), addLabels);
  document.body.dataset.ready = "true";
}

start();
