// The page: wires the form, the networks, the init image (and its inpainting mask, mask.js), drag-and-drop
// restore, generation with live progress, and the gallery. Everything goes through the A1111 API, so what
// works here works for any A1111 client, and the other way round.

import { base64Of, getOr, post, readAsDataUrl } from "./api.js";
import { bindMirrors, getField, request, setField, setOptions } from "./form.js";
import { Gallery } from "./gallery.js";
import { parseInfotext, settingsFrom } from "./infotext.js";
import { bindMaskEditor, exportMask, hasMask, painting, setMaskImage } from "./mask.js";
import { watchProgress } from "./progress.js";
import { tokenCounter } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const state = {
  tab: "txt2img",
  initImage: null, // data URL of img2img's input
  overrides: {}, // option -> {key, value}: restored from a PNG, sent as override_settings
  way: null, // "diffusers" for a PNG made our own (diffusers') way
  busy: false,
  samplerNames: [],
  scheduleLabels: [],
  models: [],
};
const gallery = new Gallery();
window.sdWebui = { state, gallery }; // for the browser tests and the curious

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// --- what the server offers ----------------------------------------------------------------------------

async function loadChoices() {
  const [samplers, schedulers, models, options, model, latentModes, upscalers] = await Promise.all([
    getOr("/sdapi/v1/samplers", [{ name: "DPM++ 2M" }, { name: "Euler a" }]),
    getOr("/sdapi/v1/schedulers", [{ label: "Automatic" }, { label: "Karras" }]),
    getOr("/sdapi/v1/sd-models", []),
    getOr("/sdapi/v1/options", {}),
    getOr("/sd/model", null),
    getOr("/sdapi/v1/latent-upscale-modes", [{ name: "Latent" }]),
    getOr("/sdapi/v1/upscalers", []),
  ]);
  // A1111's hires upscaler picker: the latent modes, then the image upscalers.
  const upscalerNames = [...latentModes, ...upscalers].map((u) => u.name);
  setOptions($("hr_upscaler"), upscalerNames, upscalerNames.includes("Latent") ? "Latent" : undefined);
  // Our diffusers-way samplers (listed with options.way) are not A1111's: the picker offers A1111's set.
  state.samplerNames = samplers.filter((s) => s.options?.way !== "diffusers").map((s) => s.name);
  state.scheduleLabels = schedulers.map((s) => s.label);
  setOptions(
    $("sampler_name"),
    state.samplerNames,
    state.samplerNames.includes("DPM++ 2M") ? "DPM++ 2M" : undefined,
  );
  setOptions($("scheduler"), state.scheduleLabels, "Automatic");
  state.models = models;
  setOptions(
    $("checkpoint"),
    models.map((m) => m.title),
    options.sd_model_checkpoint,
  );
  setField("clip_skip", options.CLIP_stop_at_last_layers ?? 1);
  // The model's own size (the built-in shapes model makes 64 px images; SD1.5 512 px).
  if (model?.native_size) for (const side of ["width", "height"]) setField(side, model.native_size);
  await loadNetworks();
}

async function loadNetworks() {
  const [loras, embeddings] = await Promise.all([
    getOr("/sdapi/v1/loras", []),
    getOr("/sdapi/v1/embeddings", { loaded: {} }),
  ]);
  // The file name, which the server finds in its LoRA folder (an alias from metadata may not be found).
  const loraNames = loras.map((l) => l.name);
  const embeddingNames = Object.keys(embeddings.loaded || {});
  $("lora_count").textContent = loraNames.length;
  $("embedding_count").textContent = embeddingNames.length;
  const button = (label, text, title) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.dataset.insert = text;
    b.addEventListener("click", () => insertIntoPrompt(text));
    return b;
  };
  $("lora_list").replaceChildren(
    ...loraNames.map((n) => button(n, `<lora:${n}:1>`, `LoRA: adds <lora:${n}:1>`)),
  );
  $("embedding_list").replaceChildren(...embeddingNames.map((n) => button(n, n, `embedding: adds ${n}`)));
}

// --- prompts -------------------------------------------------------------------------------------------

let lastPrompt = "prompt"; // the prompt box a network click goes to: the one typed in last

function insertIntoPrompt(text) {
  const box = $(lastPrompt);
  // A textarea keeps its caret when it loses focus to the button: insert there (the end, if untouched).
  const { value, selectionStart: start, selectionEnd: end } = box;
  const before = value.slice(0, start);
  const separator = before && !/[\s,]$/.test(before) ? ", " : "";
  box.value = before + separator + text + value.slice(end);
  const caret = (before + separator + text).length;
  box.setSelectionRange(caret, caret);
  box.focus();
  box.dispatchEvent(new Event("input", { bubbles: true }));
}

function bindPrompts() {
  const steps = () => getField("steps");
  const counters = [
    tokenCounter($("prompt"), $("prompt_tokens"), { steps }),
    tokenCounter($("negative_prompt"), $("negative_tokens"), { negative: true, steps }),
  ];
  $("steps").addEventListener("change", () => counters.forEach((refresh) => refresh()));
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("focus", () => (lastPrompt = id));
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        generate();
      }
    });
  }
  $("network_filter").addEventListener("input", () => {
    const needle = $("network_filter").value.toLowerCase();
    for (const b of document.querySelectorAll(".network-list button")) {
      b.hidden = !b.textContent.toLowerCase().includes(needle);
    }
  });
}

// --- tabs, seed, size, checkpoint ----------------------------------------------------------------------

function showTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("[data-tab]"))
    b.setAttribute("aria-selected", b.dataset.tab === tab);
  $("img2img_panel").hidden = tab !== "img2img";
  $("hires_panel").hidden = tab !== "txt2img"; // A1111's hires fix is txt2img's
  document.body.dataset.tab = tab;
}

function bindControls() {
  for (const b of document.querySelectorAll("[data-tab]"))
    b.addEventListener("click", () => showTab(b.dataset.tab));
  $("random_seed").addEventListener("click", () => setField("seed", -1));
  $("reuse_seed").addEventListener("click", () => {
    if (gallery.shown?.seed != null) setField("seed", gallery.shown.seed);
  });
  $("extra").addEventListener("change", () => ($("extra_panel").hidden = !$("extra").checked));
  $("enable_hr").addEventListener("change", () => ($("hires_fields").hidden = !$("enable_hr").checked));
  $("swap_size").addEventListener("click", () => {
    const [w, h] = [getField("width"), getField("height")];
    setField("width", h);
    setField("height", w);
  });
  $("checkpoint").addEventListener("change", async () => {
    const title = $("checkpoint").value;
    status(`loading ${title}…`);
    try {
      await post("/sdapi/v1/options", { sd_model_checkpoint: title });
      status(`loaded ${title}`);
      await loadNetworks();
    } catch (error) {
      status(`checkpoint: ${error.message}`, true);
    }
  });
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  for (const action of ["interrupt", "skip"]) {
    $(action).addEventListener("click", () =>
      post(`/sdapi/v1/${action}`).catch((error) => status(`${action}: ${error.message}`, true)),
    );
  }
  $("to_img2img").addEventListener("click", () => {
    if (!gallery.shown) return;
    setInitImage(gallery.shown.url);
    showTab("img2img");
  });
  $("read_parameters").addEventListener("click", readParameters);
  $("restore_shown").addEventListener("click", () => gallery.shown && restoreFrom(gallery.shown.url));
}

// --- img2img's init image ------------------------------------------------------------------------------

function setInitImage(dataUrl) {
  state.initImage = dataUrl;
  $("init_preview").src = dataUrl;
  $("init_preview").hidden = false;
  $("init_hint").hidden = true;
  setMaskImage(dataUrl).catch((error) => status(`mask: ${error.message}`, true));
}

function bindInitImage() {
  const zone = $("init_zone");
  const file = $("init_file");
  zone.addEventListener("click", () => file.click());
  zone.addEventListener("keydown", (event) => (event.key === "Enter" || event.key === " ") && file.click());
  file.addEventListener(
    "change",
    async () => file.files[0] && setInitImage(await readAsDataUrl(file.files[0])),
  );
  zone.addEventListener("dragover", (event) => event.preventDefault());
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    event.stopPropagation(); // an image dropped here is the input, not settings to restore
    $("drop_overlay").hidden = true;
    const image = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
    if (image) setInitImage(await readAsDataUrl(image));
  });
}

// --- restoring a PNG's settings ------------------------------------------------------------------------

function renderOverrides() {
  const entries = Object.entries(state.overrides);
  if (state.way) entries.push(["way", { key: "Sampling", value: state.way }]);
  $("overrides_panel").hidden = entries.length === 0;
  $("overrides").replaceChildren(
    ...entries.map(([option, { key, value }]) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.textContent = `${key}: ${value}`;
      chip.title =
        option === "way" ? "made diffusers' way (request field way)" : `override_settings.${option}`;
      chip.addEventListener("click", () => {
        if (option === "way") state.way = null;
        else delete state.overrides[option];
        renderOverrides();
      });
      return chip;
    }),
  );
}

async function restoreFrom(dataUrl) {
  try {
    const answer = await post("/sdapi/v1/png-info", { image: base64Of(dataUrl) });
    if (!answer.info) status("that image carries no generation parameters", true);
    else applySettings(answer.parameters, "the PNG");
  } catch (error) {
    status(`png-info: ${error.message}`, true);
  }
}

// A1111's ↙ button: an infotext pasted into the prompt box, or (the box empty) the shown image's.
function readParameters() {
  const text = getField("prompt").trim() || gallery.shown?.infotext || "";
  const parameters = text && parseInfotext(text);
  if (parameters) applySettings(parameters, "the text");
  else status("no generation parameters there (a settings line 'Steps: 20, Sampler: ..., ...')", true);
}

// png-info's (or parseInfotext's) parameters into the form, the override settings and the notes.
function applySettings(parameters, source) {
  const restored = settingsFrom(parameters, state);
  for (const [name, value] of Object.entries(restored.fields)) setField(name, value);
  $("extra_panel").hidden = !restored.fields.extra;
  $("hires_fields").hidden = !restored.fields.enable_hr;
  state.overrides = { ...restored.overrides };
  state.way = restored.way;
  const model = restored.model;
  const loaded = state.models.find((m) => m.title === $("checkpoint").value);
  const match =
    model.hash && state.models.find((m) => m.hash === model.hash || m.sha256?.startsWith(model.hash));
  if (match && match !== loaded) {
    state.overrides.sd_model_checkpoint = { key: "Model", value: match.title };
  }
  renderOverrides();
  const notes = [];
  if (model.hash && !match)
    notes.push(`made with model ${model.name ?? "?"} [${model.hash}], which is not here`);
  if (restored.unrestored.length) notes.push(`not restored: ${restored.unrestored.join(", ")}`);
  $("restore_note").textContent = notes.join("; ");
  status(`settings restored from ${source}`);
}

function bindPageDrop() {
  let depth = 0; // dragenter/dragleave fire for every child crossed
  document.addEventListener("dragenter", (event) => {
    if (![...(event.dataTransfer?.types || [])].includes("Files")) return;
    depth += 1;
    $("drop_overlay").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop_overlay").hidden = true;
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", async (event) => {
    event.preventDefault();
    depth = 0;
    $("drop_overlay").hidden = true;
    const file = [...(event.dataTransfer?.files || [])][0];
    if (file) await restoreFrom(await readAsDataUrl(file));
  });
}

// --- generating ----------------------------------------------------------------------------------------

// An id in A1111's form ("task(0123456789abcde)"), so /progress can tell this request from other
// clients' (see progress.js). getRandomValues, unlike randomUUID, works on a plain-http LAN address too.
function newTaskId() {
  const hex = [...crypto.getRandomValues(new Uint8Array(8))].map((b) => b.toString(16).padStart(2, "0"));
  return `task(${hex.join("").slice(0, 15)})`;
}

async function generate() {
  if (state.busy) return;
  const img2img = state.tab === "img2img";
  if (img2img && !state.initImage) {
    status("img2img needs an init image: drop one in the box or click it", true);
    return;
  }
  const inpaint = img2img && painting();
  if (inpaint && !hasMask()) {
    // An empty mask would repaint nothing (or, inverted, everything): say so rather than send it.
    status("Paint mask is on but nothing is painted: paint over the image, or turn Paint mask off", true);
    return;
  }
  const mask = inpaint ? exportMask() : null;
  const overrides = Object.fromEntries(Object.entries(state.overrides).map(([k, { value }]) => [k, value]));
  const body = request({ img2img, initImage: state.initImage, mask, overrides, way: state.way });
  body.force_task_id = newTaskId();
  state.busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = $("skip").disabled = false;
  status("");
  const stop = watchProgress(body.force_task_id, (url) => gallery.preview(url));
  const started = performance.now();
  try {
    const answer = await post(`/sdapi/v1/${img2img ? "img2img" : "txt2img"}`, body);
    const added = gallery.add(answer);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    stop(`${added.length} image${added.length === 1 ? "" : "s"} in ${seconds} s`);
    const warnings = JSON.parse(answer.info || "{}").warnings || [];
    status(warnings.join("; "), warnings.length > 0);
  } catch (error) {
    stop("");
    status(error.message, true);
  } finally {
    state.busy = false;
    $("generate").disabled = false;
    $("interrupt").disabled = $("skip").disabled = true;
  }
}

bindMirrors();
bindPrompts();
bindControls();
bindInitImage();
bindMaskEditor();
bindPageDrop();
showTab("txt2img");
loadChoices().catch((error) => status(`loading choices: ${error.message}`, true));
