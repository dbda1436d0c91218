// The chat page's logic: one conversation kept in the browser, sent whole with every question to
// the same server's OpenAI-compatible API, the answer read as a server-sent-event stream.
// All text from the model or the server goes into the page as text (textContent), never as HTML.
"use strict";

const KEY_STORAGE = "llava-chat-api-key";

const state = {
  messages: [],        // the conversation in the API's format
  image: null,         // data URL of the image to send with the next question
  model: null,         // served model id, from /v1/models
  controller: null,    // AbortController of the answer being streamed
};

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// The API answers errors as {"error": {"message": ...}}; overload answers from the proxy can be
// plain text. Either way the person sees the status and the server's own words.
async function errorText(resp) {
  const body = await resp.text();
  let message = body.trim() || resp.statusText;
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error && parsed.error.message) message = parsed.error.message;
  } catch (_) { /* not JSON: keep the text */ }
  if (resp.status === 401) message += " (enter the server's API key under Settings)";
  return "HTTP " + resp.status + ": " + message;
}

async function loadModel() {
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (!resp.ok) {
      $("model-info").textContent = "model unknown";
      showError(await errorText(resp));
      return;
    }
    const model = (await resp.json()).data[0];
    state.model = model.id;
    const source = model.root ? " (" + model.root + ")" : "";
    $("model-info").textContent = "model " + model.id + source + " · version " + model.version;
    showError("");
  } catch (err) {
    $("model-info").textContent = "server unreachable";
    showError("cannot reach the server: " + err.message);
  }
}

function setImage(dataUrl) {
  state.image = dataUrl;
  const preview = $("image-preview");
  preview.hidden = !dataUrl;
  $("image-clear").hidden = !dataUrl;
  if (dataUrl) preview.src = dataUrl; else preview.removeAttribute("src");
}

function readImage(file) {
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.onerror = () => showError("cannot read " + file.name);
  reader.readAsDataURL(file);
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.dataset.role = role;
  $("conversation").appendChild(div);
  return div;
}

function addUserBubble(text, image) {
  const div = bubble("user");
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "image sent";
    div.appendChild(img);
  }
  const p = document.createElement("p");
  p.textContent = text;
  div.appendChild(p);
  return div;
}

function addAnswerBubble() {
  const div = bubble("assistant");
  const p = document.createElement("p");
  p.className = "text";
  const meta = document.createElement("footer");
  meta.className = "muted";
  div.append(p, meta);
  div.dataset.deltas = "0";
  div.dataset.done = "false";
  return div;
}

function userContent(text, image) {
  if (!image) return text;
  // Image first, as the llava-hf model cards and the server's chat template place it.
  return [{ type: "image_url", image_url: { url: image } }, { type: "text", text: text }];
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// Reads `data: ...` events from the response body and calls onEvent with each parsed JSON payload.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function describe(answer, info) {
  const parts = [];
  if (info.model) parts.push(info.model);
  if (info.fingerprint) parts.push("version " + info.fingerprint.replace(/^llava-/, ""));
  if (info.tokens !== null) parts.push(info.tokens + " tokens");
  if (info.finish) parts.push("finish: " + info.finish);
  answer.querySelector("footer").textContent = parts.join(" · ");
}

async function ask(text) {
  const image = state.image;
  const turn = { role: "user", content: userContent(text, image) };
  const userDiv = addUserBubble(text, image);
  const answer = addAnswerBubble();
  const textEl = answer.querySelector(".text");
  const info = { model: null, fingerprint: null, tokens: null, finish: null };
  state.controller = new AbortController();
  setBusy(true);
  showError("");
  const body = {
    model: state.model || "llava",
    messages: state.messages.concat([turn]),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  let failed = null;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!resp.ok) {
      failed = await errorText(resp);
    } else {
      await readEvents(resp, (ev) => {
        if (ev.error) { failed = "the answer failed: " + ev.error.message; return; }
        info.model = ev.model || info.model;
        info.fingerprint = ev.system_fingerprint || info.fingerprint;
        if (ev.usage) info.tokens = ev.usage.completion_tokens;
        const choice = ev.choices && ev.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          textEl.textContent += choice.delta.content;
          answer.dataset.deltas = String(Number(answer.dataset.deltas) + 1);
        }
        if (choice.finish_reason) info.finish = choice.finish_reason;
        describe(answer, info);
      });
    }
  } catch (err) {
    if (err.name === "AbortError") info.finish = "stopped";
    else failed = "cannot reach the server: " + err.message;
  }
  state.controller = null;
  setBusy(false);
  if (failed && !textEl.textContent) {
    // Nothing was answered: take the question back so the conversation stays a valid alternation
    // and the person can correct it (a smaller image, another format, the API key) and resend.
    userDiv.remove();
    answer.remove();
    $("question").value = text;
    showError(failed);
    return;
  }
  if (failed) showError(failed);
  state.messages.push(turn, { role: "assistant", content: textEl.textContent });
  setImage(null);
  $("image-input").value = "";
  describe(answer, info);
  answer.dataset.done = "true";
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
  setImage(null);
  $("image-input").value = "";
  showError("");
}

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModel();
  });
  $("temperature").addEventListener("input", (e) => { $("temperature-value").textContent = e.target.value; });
  $("image-input").addEventListener("change", (e) => { if (e.target.files[0]) readImage(e.target.files[0]); });
  $("image-clear").addEventListener("click", () => { setImage(null); $("image-input").value = ""; });
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) {
      if (item.type.startsWith("image/")) { readImage(item.getAsFile()); e.preventDefault(); return; }
    }
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("question").value.trim();
    if (!text || state.controller) return;
    $("question").value = "";
    ask(text);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
