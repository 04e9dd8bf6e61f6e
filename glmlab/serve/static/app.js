// glmlab playground: the model card, streamed completions (with a suffix to fill in the middle, for runs that
// can infill) and (for vae runs) latent interpolation.
// Plain browser JavaScript, no build step: it talks to the same server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let running = null; // the AbortController of the generation in flight

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("glmlab-api-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("glmlab-api-key", keyInput.value); loadCard(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function errorText(response) {
  try { const body = await response.json(); return body.error ? body.error.message : response.statusText; }
  catch (e) { return response.status + " " + response.statusText; }
}

function unescapeText(text) { // "\n" and "\t" typed in the stop box mean newline and tab
  return text.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
}

function fmt(value) {
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(4);
  return String(value);
}

async function loadCard() {
  const fields = $("card-fields");
  try {
    const list = await fetch("/v1/models", { headers: headers() });
    if (!list.ok) throw new Error(await errorText(list));
    modelId = (await list.json()).data[0].id;
    $("model-name").textContent = modelId;
    const info = await fetch("/v1/models/" + encodeURIComponent(modelId), { headers: headers() });
    if (!info.ok) throw new Error(await errorText(info));
    const card = (await info.json()).card;
    const arch = card.architecture || {};
    const shape = ["n_layer", "n_head", "n_embd", "n_hidden", "latent_dim"].filter((k) => k in arch)
      .map((k) => k + "=" + arch[k]).join(", ");
    const m = card.metrics || {};
    const data = card.training_data || {};
    const rows = [
      ["family", card.family], ["parameters", card.parameters], ["shape", shape || "-"], ["context", card.context],
      ["tokenizer", card.tokenizer.kind + ", vocab " + fmt(card.tokenizer.vocab_size)],
      ["training data", (data.sources && data.sources.length ? data.sources.join(", ") : data.dir) || "-"],
      ["train tokens", data.train_tokens ?? "-"], ["steps", m.steps ?? "-"],
      ["train loss", m.train_loss ?? "-"], ["val loss", m.val_loss ?? "-"], ["best val loss", m.best_val_loss ?? "-"],
      ["checkpoint", card.checkpoint], ["infilling", card.infilling || "no"],
    ];
    fields.replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = fmt(v);
      return [dt, dd];
    }));
    $("vae").hidden = !card.latent;
    $("infill").hidden = !card.infilling;
    $("infill-note").textContent = INFILL_NOTES[card.infilling] || "";
    showError("");
  } catch (e) {
    fields.replaceChildren();
    showError("Could not load the model card: " + e.message);
  }
}

const INFILL_NOTES = { // how the run fills the middle between the prompt and the suffix
  fim: "(fill in the middle: this gpt writes until <eos>)",
  blank: "(fill in the middle: this glm writes the blank's piece)",
  mask_predict: "(optional: this bert writes max tokens tokens at once by mask-predict, before the suffix if given)",
};

function request() {
  const body = {
    model: modelId, prompt: $("prompt").value, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    top_k: Number($("top-k").value), max_tokens: Number($("max-tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("stop").value !== "") body.stop = [unescapeText($("stop").value)];
  if (!$("infill").hidden && $("suffix").value !== "") body.suffix = $("suffix").value;
  return body;
}

async function generate() {
  showError("");
  const outText = $("output-text");
  const body = request();
  $("output-prompt").textContent = $("prompt").value;
  $("output-suffix").textContent = body.suffix ?? "";
  outText.textContent = "";
  $("stats").textContent = "waiting…";
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  running = new AbortController();
  const started = performance.now();
  let first = null, chunks = 0, usage = null, finish = null;
  const show = () => {
    const tokens = usage ? usage.completion_tokens : chunks;
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "-";
    const ttft = first === null ? "-" : ((first - started) / 1000).toFixed(2) + " s";
    $("stats").textContent = `${tokens} tokens · ${rate} tokens/s · first token ${ttft}` +
      (finish ? ` · finish: ${finish}` : "");
  };
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.text) {
            if (first === null) first = performance.now();
            outText.textContent += choice.text;
            chunks += 1;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        show();
      }
    }
    show();
    $("stats").dataset.done = "true";
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
    else { finish = "stopped"; show(); }
  } finally {
    $("generate").disabled = false;
    $("stop-button").disabled = true;
    running = null;
  }
}

async function latent(path, body, field) { // a vae endpoint; its sentences listed under the view
  showError("");
  const list = $("interpolation");
  list.replaceChildren();
  try {
    const response = await fetch("/v1/vae/" + path, {
      method: "POST", headers: headers(), body: JSON.stringify({ model: modelId, ...body }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for (const sentence of (await response.json())[field]) {
      const li = document.createElement("li");
      li.textContent = sentence;
      list.appendChild(li);
    }
  } catch (e) {
    showError(e.message);
  }
}

$("generate").addEventListener("click", () => { delete $("stats").dataset.done; generate(); });
$("stop-button").addEventListener("click", () => running && running.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
$("interpolate").addEventListener("click", () => latent("interpolate", {
  start: $("vae-start").value, end: $("vae-end").value, steps: Number($("vae-steps").value) }, "sentences"));
$("vae-sample").addEventListener("click", () => latent("sample", {
  n: 5, temperature: Number($("temperature").value),
  seed: $("seed").value !== "" ? Number($("seed").value) : Math.floor(Math.random() * 1e9),
}, "samples"));
loadCard();
