// Single-page chat for `llama-adapter serve`: plain JS, no build step.
// Streams /v1/chat/completions (server-sent events read with fetch) and stops with AbortController.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { history: [], models: [], attachment: null, controller: null };
// What each modality's file picker accepts, and how a file of it goes into a message:
// image_url (OpenAI), input_audio (OpenAI), input_video / input_points (this server's, same shape).
const KINDS = {
  image: { accept: "image/*", part: null },
  audio: { accept: "audio/*,.mp3,.wav,.flac,.ogg", part: "input_audio", formats: ["mp3", "wav", "flac", "ogg"] },
  video: { accept: "video/*,.mp4,.webm,.gif", part: "input_video", formats: ["mp4", "webm", "gif"] },
  points: { accept: ".ply,.npy,.xyz", part: "input_points", formats: ["ply", "npy", "xyz"] },
};

function extension(name) { const i = name.lastIndexOf("."); return i < 0 ? "" : name.slice(i + 1).toLowerCase(); }

// The modality of a picked file among those the model takes (null: none fits).
function kindOf(file, takes) {
  const ext = extension(file.name);
  for (const k of takes) {
    if (KINDS[k].formats && KINDS[k].formats.includes(ext)) return k;
  }
  if (takes.includes("image") && file.type.startsWith("image/")) return "image";
  return null;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

function addMessage(role, text, attachment) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (attachment && attachment.kind === "image") {
    const img = document.createElement("img");
    img.src = attachment.url;
    img.alt = "attached image";
    el.appendChild(img);
  } else if (attachment) {
    const tag = document.createElement("div");
    tag.className = "attached";
    tag.textContent = "[" + attachment.kind + ": " + attachment.name + "]";
    el.appendChild(tag);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  el.appendChild(span);
  $("log").appendChild(el);
  $("log").scrollTop = $("log").scrollHeight;
  return el;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    state.models = body.data;
    const sel = $("model");
    const previous = sel.value || localStorage.getItem("llama-adapter-model");
    sel.innerHTML = "";
    for (const m of body.data) {
      const o = document.createElement("option");
      o.value = m.id;
      const takes = m.modalities || (m.multimodal ? ["image"] : []);
      o.textContent = m.id + (m.adapter ? " (adapter" + (takes.length ? ", " + takes.join(", ") : "") + ")" : " (base)");
      sel.appendChild(o);
    }
    if (previous && body.data.some((m) => m.id === previous)) sel.value = previous;
    updateImageControl();
    status("");
  } catch (e) {
    status("could not list models: " + e.message);
  }
}

function currentModel() { return state.models.find((m) => m.id === $("model").value); }

function currentTakes() {
  const m = currentModel();
  return m ? (m.modalities || (m.multimodal ? ["image"] : [])) : [];
}

function updateImageControl() {
  const takes = currentTakes();
  const ok = takes.length > 0;
  $("image").disabled = !ok;
  $("image").accept = takes.map((k) => KINDS[k].accept).join(",");
  document.querySelector(".attach").title = ok ? "attach " + takes.join(" / ") : "this model takes text only";
  document.querySelector(".attach").classList.toggle("disabled", !ok);
  clearImage();
}

function clearImage() {
  state.attachment = null;
  $("image").value = "";
  $("image-name").textContent = currentTakes().join(" / ") || "attach";
}

// The content part for an attachment (its data URL's base64 payload for the input_* parts).
function contentPart(a) {
  if (a.kind === "image") return { type: "image_url", image_url: { url: a.url } };
  const part = KINDS[a.kind].part;
  return { type: part, [part]: { data: a.url.slice(a.url.indexOf(",") + 1), format: a.format } };
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("model").disabled = busy;
}

async function send(text) {
  const userContent = state.attachment ? [{ type: "text", text }, contentPart(state.attachment)] : text;
  addMessage("user", text, state.attachment);
  state.history.push({ role: "user", content: userContent });
  clearImage();
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  out.dataset.chunks = "0";
  const textEl = out.querySelector(".text");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  status("generating...");
  let reply = "";
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value,
        messages: state.history,
        stream: true,
        stream_options: { include_usage: true },
        temperature: parseFloat($("temperature").value),
        max_tokens: parseInt($("max-tokens").value, 10),
      }),
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) status(`${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} completion tokens`);
          const c = chunk.choices && chunk.choices[0];
          if (!c) continue;
          if (c.delta && c.delta.content) {
            reply += c.delta.content;
            textEl.textContent = reply;
            out.dataset.chunks = String(parseInt(out.dataset.chunks, 10) + 1);
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    if (finish === "length") status($("status").textContent + " (stopped at max tokens)");
  } catch (e) {
    if (e.name === "AbortError") {
      status("stopped");
      finish = "stopped";
    } else {
      addMessage("error", "error: " + e.message);
      status("");
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.finish = finish || "error";
    state.history.push({ role: "assistant", content: reply });
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("log").innerHTML = "";
  status("");
});
$("model").addEventListener("change", () => {
  localStorage.setItem("llama-adapter-model", $("model").value);
  updateImageControl();
});
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("llama-adapter-key", $("api-key").value);
  loadModels();
});
$("image").addEventListener("change", () => {
  const f = $("image").files[0];
  if (!f) return clearImage();
  const kind = kindOf(f, currentTakes());
  if (!kind) {
    clearImage();
    status(f.name + ": this model takes " + (currentTakes().join(", ") || "text only"));
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.attachment = { kind, url: reader.result, name: f.name, format: extension(f.name) };
    $("image-name").textContent = kind + ": " + f.name;
    status("");
  };
  reader.readAsDataURL(f);
});
$("api-key").value = sessionStorage.getItem("llama-adapter-key") || "";
loadModels();
