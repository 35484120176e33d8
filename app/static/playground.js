// The playground: pick an image and a prompt, stream the answer of POST /generate, show its
// timings, compare a preset with `none`, and overlay the kept image tokens. No build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "lightvlm.apiKey";
const state = { imageUrl: null, samples: [], config: null, controller: null };

// ---- set-up ------------------------------------------------------------------------------------

async function init() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", () => localStorage.setItem(KEY_STORAGE, $("api-key").value));
  setUpImageInput();
  $("question").addEventListener("change", () => {
    if ($("question").value) $("prompt").value = $("question").value;
  });
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") send(); });
  $("clear-image").addEventListener("click", () => setImage(null));
  await Promise.all([loadConfig(), loadSamples()]);
}

async function loadConfig() {
  const config = await (await fetch("/playground/config")).json();
  state.config = config;
  $("model").textContent = `model ${config.model}` + (config.ready ? "" : " (loading…)");
  for (const name of config.presets) {
    $("preset").append(new Option(name, name, false, name === (config.default_preset === "none" ? "balanced" : config.default_preset)));
  }
  $("max-tokens").value = config.max_new_tokens;
  $("key-row").classList.toggle("required", config.api_key_required);
  fillQuestions(null);
}

async function loadSamples() {
  state.samples = await (await fetch("/playground/samples")).json();
  for (const sample of state.samples) {
    const img = new Image();
    img.src = sample.url;
    img.alt = sample.name;
    img.title = `${sample.name}: ${sample.objects}`;
    img.dataset.sample = sample.name;
    img.addEventListener("click", () => pickSample(sample));
    $("samples").append(img);
  }
}

function pickSample(sample) {
  setImage(sample.url, sample.name);
  fillQuestions(sample);
  if (sample.questions.length) $("prompt").value = sample.questions[0].question;
}

/** The question menu: a sample's own questions (with the right answer), else the patterns. */
function fillQuestions(sample) {
  const menu = $("question");
  menu.length = 1;
  const items = sample
    ? sample.questions.map((q) => [q.question, `${q.question}  (answer: ${q.answer})`])
    : (state.config ? state.config.question_patterns : []).map((q) => [q, q]);
  for (const [value, text] of items) menu.append(new Option(text, value));
}

function setUpImageInput() {
  const drop = $("drop");
  $("file").addEventListener("change", () => $("file").files[0] && readFile($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => { setImage(reader.result, null); fillQuestions(null); };
  reader.readAsDataURL(file);
}

function setImage(url, sampleName) {
  state.imageUrl = url;
  $("preview").hidden = !url;
  $("drop-hint").hidden = !!url;
  if (url) $("preview").src = url;
  for (const img of $("samples").querySelectorAll("img")) {
    img.classList.toggle("selected", img.dataset.sample === sampleName);
  }
}

// ---- sending -----------------------------------------------------------------------------------

async function send() {
  showError(null);
  const preset = $("preset").value;
  const runs = $("compare").checked ? ["none", preset] : [preset];
  let image;
  try {
    image = await imageAsDataUrl();
  } catch (err) {
    showError(`could not read the image: ${err.message}`);
    return;
  }
  $("results").replaceChildren();
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    await Promise.all(runs.map((p) => run(p, image, newResultCard(p), state.controller.signal)));
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

/** Samples are URLs on this server: the API takes data URLs, so fetch and encode them. */
async function imageAsDataUrl() {
  const url = state.imageUrl;
  if (!url || url.startsWith("data:")) return url;
  const blob = await (await fetch(url)).blob();
  return await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function newResultCard(preset) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.dataset.preset = preset;
  card.querySelector(".title").textContent = `preset: ${preset}`;
  $("results").append(card);
  return card;
}

function requestBody(preset, image) {
  const body = {
    prompt: $("prompt").value,
    max_new_tokens: Number($("max-tokens").value) || 32,
    stream: true,
    acceleration: { preset },
  };
  if (image) body.image = image;
  if (image && $("overlay").checked) body.return_kept_patches = true;
  return body;
}

async function run(preset, image, card, signal) {
  const answer = card.querySelector(".answer");
  const headers = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  answer.classList.add("streaming");
  try {
    const response = await fetch("/generate", {
      method: "POST", headers, body: JSON.stringify(requestBody(preset, image)), signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of sseEvents(response)) {
      if (event.type === "token") answer.textContent += event.text;
      else if (event.type === "done") showDone(card, event, image);
      else if (event.type === "error") throw new Error(`${event.error_type}: ${event.message}`);
    }
  } catch (err) {
    const box = card.querySelector(".result-error");
    box.hidden = false;
    box.textContent = err.name === "AbortError" ? "stopped" : err.message;
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    answer.classList.remove("streaming");
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error) return `${response.status} ${body.error.type}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

/** The `data:` payloads of a text/event-stream response, parsed, until `[DONE]`. */
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function showDone(card, event, image) {
  const { usage, timings } = event;
  const set = (name, text) => { card.querySelector(`[data-stat="${name}"]`).textContent = text; };
  set("prefill_ms", `${timings.prefill_ms.toFixed(1)} ms`);
  set("ttft_ms", `${timings.ttft_ms.toFixed(1)} ms`);
  set("kept", usage.image_tokens ? `${usage.image_tokens_kept} of ${usage.image_tokens}` : "no image");
  set("kv_cache_bytes", formatBytes(usage.kv_cache_bytes));
  set("tokens_per_second", `${timings.tokens_per_second.toFixed(1)} tokens/s`);
  set("finish_reason", event.finish_reason);
  KeptOverlay.show(card.querySelector(".overlay"), image, event.kept_patches);
}

function formatBytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(2)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

init().catch((err) => showError(`the playground could not start: ${err.message}`));
