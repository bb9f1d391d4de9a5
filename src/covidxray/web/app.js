// covidxray web page: upload one X-ray, show the answer, the threshold and the Grad-CAM heat map.
// Plain JS, no libraries: the page must work without any network but its own server.
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: fall back to the status */ }
  return `the server answered HTTP ${response.status}`;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/model", { headers: headers() });
    if (!response.ok) {
      $("model-name").textContent = response.status === 401 ? "(enter the API key below)" : "(unavailable)";
      return;
    }
    const card = await response.json();
    $("model-name").textContent = `${card.name} (${card.backend}, weights ${card.sha256.slice(0, 12)})`;
  } catch (_) {
    $("model-name").textContent = "(server unreachable)";
  }
}

function showResult(answer) {
  const label = $("result-label");
  // Not a frontal chest X-ray: no answer, in a neutral colour, with the reason; no score, no heat map.
  const answered = answer.label !== "not_answered";
  if (!answered) {
    label.textContent = `No answer: ${answer.message}`;
    label.className = "label none";
  } else {
    const positive = answer.label === "covid";
    label.textContent = positive ? "COVID-19 positive" : "COVID-19 negative";
    label.className = `label ${positive ? "positive" : "negative"}`;
    $("probability").textContent = answer.probability.toFixed(4);
  }
  $("threshold").textContent = answer.threshold.toFixed(4);
  $("site-used").textContent = answer.site_onboarded ? `site ${answer.site}` : "site not onboarded: the model's default threshold";
  $("scores").hidden = !answered;
  $("warning").textContent = answered && answer.message ? `Warning: ${answer.message}` : "";
  $("warning").hidden = !(answered && answer.message);
  $("filename").textContent = answer.filename;
  $("timing").textContent = `${Math.round(answer.timing_ms)} ms`;
  // Server-rendered PNGs for both views: browsers cannot show DICOM, and both have the same size.
  $("xray").src = `data:image/png;base64,${answer.preview_png}`;
  $("heatmap").src = answer.heatmap_png ? `data:image/png;base64,${answer.heatmap_png}` : "";
  $("heatmap-control").hidden = !answer.heatmap_png;
  applyToggle();
  $("result").hidden = false;
}

function applyToggle() {
  const on = $("heatmap-toggle").checked && !$("heatmap-control").hidden;
  $("heatmap").hidden = !on;
  $("xray").hidden = on;
}

async function classify(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = `Classifying ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const site = $("site").value.trim();
    const query = `explain=true&preview=true${site ? `&site=${encodeURIComponent(site)}` : ""}`;
    const response = await fetch(`/v1/predict?${query}`, { method: "POST", body: form, headers: headers() });
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    showResult(await response.json());
    loadModel(); // the key may have been entered just now
  } catch (err) {
    showError(`could not reach the server: ${err.message}`);
  } finally {
    $("status").textContent = "";
  }
}

// The results list: what `covidxray listen` recorded (shown only when the server has a results database).
const ANSWERS = { covid: "COVID-19 positive", normal: "COVID-19 negative", not_answered: "not answered", error: "not readable" };

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

async function showResultHeatmap(uid) {
  const response = await fetch(`/v1/results/heatmap?sop_instance_uid=${encodeURIComponent(uid)}`, { headers: headers() });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const old = $("results-heatmap").src;
  $("results-heatmap").src = URL.createObjectURL(await response.blob());
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $("results-figure").hidden = false;
}

async function loadResults() {
  let response;
  try {
    response = await fetch("/v1/results?limit=50", { headers: headers() });
  } catch (_) {
    return;
  }
  if (!response.ok) { // 404: no results database on this server; 401: the key is still to come
    $("results-list").hidden = true;
    return;
  }
  const rows = (await response.json()).results;
  const body = $("results-rows");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    cell(tr, r.received_at.slice(0, 19).replace("T", " "));
    cell(tr, `…${r.study_instance_uid.slice(-12)}`).title = r.study_instance_uid;
    const answer = ANSWERS[r.label] || r.label;
    cell(tr, r.reason ? `${answer}: ${r.reason}` : answer, `answer-${r.label}`); // not "error": that class styles alerts
    cell(tr, r.probability === null ? "—" : r.probability.toFixed(4));
    const link = cell(tr, "");
    if (r.heatmap) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "heatmap-link";
      button.textContent = "show";
      button.addEventListener("click", () => showResultHeatmap(r.sop_instance_uid));
      link.appendChild(button);
    }
    body.appendChild(tr);
  }
  $("results-empty").hidden = rows.length > 0;
  $("results-list").hidden = false;
}

function setUp() {
  const zone = $("drop-zone");
  $("file").addEventListener("change", () => {
    if ($("file").files.length) classify($("file").files[0]);
  });
  $("heatmap-toggle").addEventListener("change", applyToggle);
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
  $("api-key").addEventListener("change", () => { loadModel(); loadResults(); });
  $("results-refresh").addEventListener("click", loadResults);
  loadModel();
  loadResults();
}

document.addEventListener("DOMContentLoaded", setUp);
