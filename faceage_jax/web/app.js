// The page: pick or drop a photo, choose a direction and a strength, see it aged.
// Everything goes to this page's own server (POST /api/age); nothing else is loaded.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null, originalUrl: null, resultUrl: null, request: 0, timer: null, controller: null,
};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

function settings() {
  const direction = document.querySelector("input[name=direction]:checked").value;
  const strength = Number($("strength").value) / 100;
  return { direction, strength };
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    const info = await response.json();
    $("model").textContent = `Model: ${info.description} Photos up to ${info.max_upload_mb} MB.`;
  } catch (error) {
    $("model").textContent = "The model's description could not be read.";
  }
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
  state.originalUrl = URL.createObjectURL(file);
  $("drop-text").textContent = file.name;
  age();
}

function ageSoon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(age, 250);
}

async function age() {
  if (!state.file) return;
  const request = ++state.request;  // Only the newest request's answer is shown...
  if (state.controller) state.controller.abort();  // ...and an older one is not waited for.
  state.controller = new AbortController();
  const { direction, strength } = settings();
  const form = new FormData();
  form.append("photo", state.file, state.file.name);
  form.append("direction", direction);
  form.append("strength", String(strength));
  form.append("format", state.file.type === "image/png" ? "png" : "jpeg");
  showError("");
  setStatus("Aging the photo\u2026");
  let response;
  try {
    response = await fetch("/api/age", {
      method: "POST", body: form, signal: state.controller.signal,
    });
  } catch (error) {
    if (request === state.request && error.name !== "AbortError") {
      setStatus("");
      showError("The server could not be reached. Is it still running?");
    }
    return;
  }
  if (request !== state.request) return;
  if (!response.ok) {
    let message = `The server answered ${response.status}.`;
    try {
      message = (await response.json()).error || message;
    } catch (error) { /* Not JSON: keep the status line. */ }
    setStatus("");
    showError(message);
    $("results").hidden = true;
    return;
  }
  const blob = await response.blob();
  if (request !== state.request) return;
  const box = JSON.parse(response.headers.get("X-Face-Box") || "null");
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  try {
    await load($("result"), state.resultUrl);
  } catch (error) {
    setStatus("");
    showError("The aged photo came back, but this browser cannot show it: download it below.");
  }
  // The browser may not show every format it can upload (HEIC, TIFF): then no "before".
  let shown = true;
  try {
    await load($("original"), state.originalUrl);
  } catch (error) {
    shown = false;
  }
  $("original").closest("figure").hidden = !shown;
  $("compare").closest("figure").hidden = !shown;
  if (shown) drawCompare(box);
  const stem = state.file.name.replace(/\.[^.]+$/, "") || "photo";
  const extension = blob.type === "image/png" ? "png" : "jpg";
  $("download").href = state.resultUrl;
  $("download").download = `${stem}-${direction === "young_to_old" ? "aged" : "younger"}.${extension}`;
  $("results").hidden = false;
  $("results").dataset.ready = String(request);
  setStatus(`Done: strength ${Math.round(strength * 100)} %.`);
}

function load(image, url) {
  return new Promise((resolve, reject) => {
    image.onload = () => resolve();
    image.onerror = () => reject(new Error("image"));
    image.src = url;
  });
}

function drawCompare(box) {
  // The face, twice its box's size around it, before and after.
  const before = $("original");
  const after = $("result");
  const width = after.naturalWidth;
  const height = after.naturalHeight;
  let [left, top, right, bottom] = box || [0, 0, width, height];
  const size = Math.max(right - left, bottom - top) * 2;
  const cx = (left + right) / 2;
  const cy = (top + bottom) / 2;
  const x = Math.max(0, Math.min(width - size, cx - size / 2));
  const y = Math.max(0, Math.min(height - size, cy - size / 2));
  const side = Math.min(size, width, height);
  for (const [id, image] of [["compare-before", before], ["compare-after", after]]) {
    const canvas = $(id);
    canvas.width = 512;
    canvas.height = 512;
    canvas.getContext("2d").drawImage(image, x, y, side, side, 0, 0, 512, 512);
  }
  updateSplit();
}

function updateSplit() {
  const split = Number($("compare-slider").value);
  $("compare-before").style.clipPath = `inset(0 ${100 - split}% 0 0)`;
  $("compare").style.setProperty("--split", `${split}%`);
}

$("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
$("strength").addEventListener("input", () => {
  $("strength-value").textContent = `${$("strength").value} %`;
  ageSoon();
});
for (const radio of document.querySelectorAll("input[name=direction]")) {
  radio.addEventListener("change", age);
}
$("compare-slider").addEventListener("input", updateSplit);
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  chooseFile(event.dataTransfer.files[0]);
});
loadInfo();
