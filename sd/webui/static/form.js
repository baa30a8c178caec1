// The settings form: each setting is the element with its A1111 field name as id (a choice of radio
// buttons: the fieldset holding them); a slider's number box (data-mirror) follows it both ways. request()
// turns the form into an A1111 txt2img / img2img body.

const $ = (id) => document.getElementById(id);

const NUMBERS = [
  "steps",
  "width",
  "height",
  "n_iter",
  "batch_size",
  "cfg_scale",
  "seed",
  "subseed",
  "subseed_strength",
  "denoising_strength",
  "clip_skip",
  "hr_second_pass_steps",
  "hr_denoising_strength",
  "hr_scale",
  "hr_resize_x",
  "hr_resize_y",
  "mask_blur",
  "inpainting_mask_invert",
  "inpainting_fill",
  "inpaint_full_res",
  "inpaint_full_res_padding",
];
// img2img's inpainting controls, sent with a mask (A1111's field names; inpaint_full_res is a boolean).
const INPAINT = ["mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res_padding"];

export function bindMirrors() {
  for (const box of document.querySelectorAll("[data-mirror]")) {
    const slider = $(box.dataset.mirror);
    slider.addEventListener("input", () => (box.value = slider.value));
    // While typing the slider follows (clamped to its range); a typed value outside the range widens it
    // once committed (change), not on each keystroke ("1" on the way to "128").
    box.addEventListener("input", () => {
      if (box.value !== "") slider.value = box.value;
    });
    box.addEventListener("change", () => {
      if (box.value !== "") widen(slider, Number(box.value), false);
      slider.value = box.value === "" ? slider.value : box.value;
      box.value = slider.value; // snapped to the slider's step (sizes: multiples of 8)
      slider.dispatchEvent(new Event("change", { bubbles: true }));
    });
  }
}

// A value from a PNG or typed may lie outside a slider's usual range (300 steps): the slider grows to
// hold it (typed: upwards only, a typo below the minimum is clamped).
function widen(slider, value, down = true) {
  if (slider.type !== "range" || !Number.isFinite(value)) return;
  if (value > Number(slider.max)) slider.max = value;
  if (down && value < Number(slider.min)) slider.min = value;
}

export function setOptions(select, values, selected) {
  select.replaceChildren(
    ...values.map((value) => {
      const option = document.createElement("option");
      option.value = option.textContent = value;
      return option;
    }),
  );
  // No change event: filling a picker is not a choice (the checkpoint's would load a model).
  if (selected !== undefined) {
    addOption(select, selected);
    select.value = String(selected);
  }
}

// A name the server did not list (a PNG from another A1111) is kept visible: the server's answer to it
// says what is wrong, rather than the form quietly choosing something else.
function addOption(select, value) {
  if ([...select.options].some((o) => o.value === String(value))) return;
  const option = document.createElement("option");
  option.value = option.textContent = String(value);
  select.append(option);
}

const checkedRadio = (fieldset) => fieldset.querySelector("input[type=radio]:checked");

export function getField(name) {
  const element = $(name);
  if (element.type === "checkbox") return element.checked;
  if (element.tagName === "FIELDSET") {
    const value = checkedRadio(element).value;
    return NUMBERS.includes(name) ? Number(value) : value;
  }
  return NUMBERS.includes(name) ? Number(element.value) : element.value;
}

export function setField(name, value) {
  const element = $(name);
  if (!element || value === undefined || value === null) return;
  if (element.type === "checkbox") {
    element.checked = Boolean(value);
  } else if (element.tagName === "FIELDSET") {
    const radio = element.querySelector(`input[type=radio][value="${CSS.escape(String(value))}"]`);
    if (radio) radio.checked = true;
  } else if (element.tagName === "SELECT") {
    addOption(element, value);
    element.value = String(value);
  } else {
    widen(element, Number(value));
    element.value = value;
    const box = document.querySelector(`[data-mirror="${name}"]`);
    if (box) box.value = element.value;
  }
  element.dispatchEvent(new Event("input", { bubbles: true }));
  element.dispatchEvent(new Event("change", { bubbles: true }));
}

// The request body as A1111's API takes it. `overrides`: {option: value} sent as override_settings
// (clip skip is sent there too, as A1111's UI does); `mask`: img2img's inpainting mask (a PNG data URL).
export function request({ img2img = false, initImage = null, mask = null, overrides = {}, way = null } = {}) {
  const body = {
    prompt: getField("prompt"),
    negative_prompt: getField("negative_prompt"),
    sampler_name: getField("sampler_name"),
    scheduler: getField("scheduler"),
    steps: getField("steps"),
    cfg_scale: getField("cfg_scale"),
    seed: getField("seed"),
    width: getField("width"),
    height: getField("height"),
    batch_size: getField("batch_size"),
    n_iter: getField("n_iter"),
    override_settings: { ...overrides, CLIP_stop_at_last_layers: getField("clip_skip") },
    override_settings_restore_afterwards: true,
    send_images: true,
    save_images: false,
  };
  if (getField("extra")) {
    body.subseed = getField("subseed");
    body.subseed_strength = getField("subseed_strength");
  }
  if (way) body.way = way;
  if (img2img) {
    body.init_images = [initImage];
    body.denoising_strength = getField("denoising_strength");
    if (mask) {
      // All of A1111's UI fields, so its API's defaults (blur 4, fill, only masked) do not apply instead.
      Object.assign(body, { mask, inpaint_full_res: getField("inpaint_full_res") === 1 });
      for (const name of INPAINT) body[name] = getField(name);
    }
  } else if (getField("enable_hr")) {
    // A1111's txt2img fields: the second pass's strength is the request's denoising_strength.
    Object.assign(body, {
      enable_hr: true,
      hr_upscaler: getField("hr_upscaler"),
      hr_second_pass_steps: getField("hr_second_pass_steps"),
      denoising_strength: getField("hr_denoising_strength"),
      hr_scale: getField("hr_scale"),
      hr_resize_x: getField("hr_resize_x"),
      hr_resize_y: getField("hr_resize_y"),
    });
  }
  return body;
}
