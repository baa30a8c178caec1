// A PNG's settings back into the form: /sdapi/v1/png-info parses the infotext as A1111 does ("Size-1",
// "Size-2", "Prompt", ...); here its keys become form fields, and the keys A1111 pastes as "Override
// settings" become override_settings (its infotext_to_setting_name_mapping, for the options we honour).

// infotext key -> [form field, type]
const FIELDS = {
  Prompt: ["prompt", String],
  "Negative prompt": ["negative_prompt", String],
  Steps: ["steps", Number],
  "CFG scale": ["cfg_scale", Number],
  Seed: ["seed", Number],
  "Size-1": ["width", Number],
  "Size-2": ["height", Number],
  "Denoising strength": ["denoising_strength", Number],
  "Clip skip": ["clip_skip", Number],
  "Variation seed": ["subseed", Number],
  "Variation seed strength": ["subseed_strength", Number],
  "Hires steps": ["hr_second_pass_steps", Number],
  "Hires upscale": ["hr_scale", Number],
  "Hires resize-1": ["hr_resize_x", Number],
  "Hires resize-2": ["hr_resize_y", Number],
  "Hires upscaler": ["hr_upscaler", String],
};
// Any of these means the image was made with the hires fix (A1111's txt2img paste turns it on).
const HIRES = ["Hires upscale", "Hires resize-1", "Hires upscaler"];

// infotext key -> [A1111 option name, type]
export const OVERRIDES = {
  ENSD: ["eta_noise_seed_delta", Number],
  RNG: ["randn_source", String],
  Eta: ["eta_ancestral", Number],
  "Eta DDIM": ["eta_ddim", Number],
  "Sigma churn": ["s_churn", Number],
  "Sigma tmin": ["s_tmin", Number],
  "Sigma tmax": ["s_tmax", Number],
  "Sigma noise": ["s_noise", Number],
  "Schedule min sigma": ["sigma_min", Number],
  "Schedule max sigma": ["sigma_max", Number],
  "Schedule rho": ["rho", Number],
  "Noise multiplier": ["initial_noise_multiplier", Number],
  "Discard penultimate sigma": ["always_discard_next_to_last_sigma", Boolean],
  "SGM noise multiplier": ["sgm_noise_multiplier", Boolean],
  "Downcast alphas_cumprod": ["use_downcasted_alpha_bar", Boolean],
  "Old prompt editing timelines": ["use_old_scheduling", Boolean],
  "Pad conds": ["pad_cond_uncond", Boolean],
  Emphasis: ["emphasis", String],
  "Conditional mask weight": ["inpainting_mask_weight", Number],
};

// Inpainting's keys, as sd.inpaint.InpaintSettings.infotext (A1111) writes them: each only when it is not
// A1111's UI default, so with any of them there the absent ones are restored as those defaults ("Mask
// blur" absent: 0, written only when > 0). "Mask blur x/y" are ours, for blurs that differ per axis.
const INPAINT_KEYS = [
  "Mask blur",
  "Mask blur x",
  "Mask blur y",
  "Mask mode",
  "Inpaint area",
  "Masked area padding",
  "Masked content",
];
const FILL_MODES = ["fill", "original", "latent noise", "latent nothing"]; // inpainting_fill 0..3

// Keys that describe an image without changing how it is made, or that the prompt already carries
// (Lora hashes: its <lora:...> tags apply the files): restored by nothing, and not worth a warning.
const NO_EFFECT = new Set([
  "Model",
  "Model hash",
  "Version",
  "TI hashes",
  "Lora hashes",
  "Batch size",
  "Batch pos",
  "User",
  "VAE hash",
  "Init image hash",
  "Sampler",
  "Schedule type",
  "Sampling",
  "Seed resize from-1",
  "Seed resize from-2",
]);

const HR_KEYS = ["hr_upscaler", "hr_second_pass_steps", "hr_scale", "hr_resize_x", "hr_resize_y"];
const pick = (object, keys) => Object.fromEntries(keys.filter((k) => k in object).map((k) => [k, object[k]]));

const convert = (type, text) => {
  if (type === Boolean) return String(text).toLowerCase() === "true";
  if (type === Number) return Number(text);
  return String(text);
};

const parseVersion = (text) => {
  const match = /^v(\d+)\.(\d+)(?:\.(\d+))?/.exec(String(text || "").trim());
  return match ? [Number(match[1]), Number(match[2]), Number(match[3] || 0)] : null;
};
const before = (version, [major, minor]) =>
  version[0] < major || (version[0] === major && version[1] < minor);

// The sampler and schedule: A1111 before v1.9 folded the schedule into the name ("DPM++ 2M Karras"), and
// a plain name without a "Schedule type" then meant the sampler's own (uniform) schedule, as
// sd.params.GenerationParams.from_text reads them.
function samplerAndSchedule(params, samplerNames, scheduleLabels) {
  let sampler = params.Sampler;
  let schedule = params["Schedule type"];
  if (sampler === undefined) return {};
  if (!samplerNames.includes(sampler)) {
    const label = scheduleLabels.find((l) => sampler.endsWith(` ${l}`));
    const base = label && sampler.slice(0, -label.length - 1);
    if (label && samplerNames.includes(base)) return { sampler_name: base, scheduler: label };
  }
  if (schedule === undefined && params.Sampling !== "diffusers") {
    const version = parseVersion(params.Version);
    schedule = params.Version === undefined || (version && before(version, [1, 9])) ? "Uniform" : "Automatic";
  }
  return { sampler_name: sampler, scheduler: schedule ?? "Automatic" };
}

// img2img's inpainting controls (form.js's A1111 field names; the radios' values are numbers).
function inpaintFields(params) {
  if (!INPAINT_KEYS.some((key) => key in params)) return {};
  const text = (key, absent) => String(params[key] ?? absent).trim();
  const fill = FILL_MODES.indexOf(text("Masked content", "original").toLowerCase());
  return {
    mask_blur: Number(params["Mask blur"] ?? params["Mask blur x"] ?? 0),
    inpainting_mask_invert: text("Mask mode", "") === "Inpaint not masked" ? 1 : 0,
    ...(fill >= 0 && { inpainting_fill: fill }),
    inpaint_full_res: text("Inpaint area", "") === "Only masked" ? 1 : 0,
    inpaint_full_res_padding: Number(params["Masked area padding"] ?? 32),
  };
}

// {fields, overrides, way, unrestored, model} from png-info's `parameters`. `samplerNames` and
// `scheduleLabels`: what the server lists, to split old combined names.
export function settingsFrom(params, { samplerNames = [], scheduleLabels = [] } = {}) {
  const fields = {};
  const overrides = {};
  const unrestored = [];
  for (const [key, value] of Object.entries(params)) {
    if (key in FIELDS) {
      const [name, type] = FIELDS[key];
      fields[name] = convert(type, value);
    } else if (key in OVERRIDES) {
      const [name, type] = OVERRIDES[key];
      overrides[name] = { key, value: convert(type, value) };
    } else if (!NO_EFFECT.has(key) && !INPAINT_KEYS.includes(key)) {
      unrestored.push(key);
    }
  }
  Object.assign(fields, samplerAndSchedule(params, samplerNames, scheduleLabels));
  Object.assign(fields, inpaintFields(params));
  // The form has one blur for both axes: the x one is restored, a different y one is said to be lost.
  const blurY = params["Mask blur y"];
  if (blurY !== undefined && blurY !== params["Mask blur x"]) unrestored.push("Mask blur y");
  if (!("Negative prompt" in params) && "Prompt" in params) fields.negative_prompt = "";
  if (!("Clip skip" in params)) fields.clip_skip = 1; // A1111 writes it only when it is not 1
  // With the hires fix, "Denoising strength" is its second pass's; the form has one for each tab.
  fields.enable_hr = HIRES.some((key) => key in params);
  if (fields.enable_hr) {
    if ("denoising_strength" in fields) fields.hr_denoising_strength = fields.denoising_strength;
    delete fields.denoising_strength;
    Object.assign(fields, { hr_upscaler: "Latent", hr_second_pass_steps: 0, ...pick(fields, HR_KEYS) });
    if (!("Hires upscale" in params)) fields.hr_scale ??= 2;
    if (!("Hires resize-1" in params)) Object.assign(fields, { hr_resize_x: 0, hr_resize_y: 0 });
  }
  fields.extra = Boolean(fields.subseed_strength);
  if (!fields.extra) Object.assign(fields, { subseed: -1, subseed_strength: 0 });
  return {
    fields,
    overrides,
    way: params.Sampling === "diffusers" ? "diffusers" : null,
    unrestored,
    model: { name: params.Model, hash: params["Model hash"] },
  };
}

// A1111's re_param: a key, then a JSON-quoted value or anything up to the next comma.
const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
const NEGATIVE = "Negative prompt:";

const unquote = (value) => {
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) {
    try {
      return JSON.parse(value);
    } catch {
      return value; // A1111 keeps such a value as it is
    }
  }
  return value;
};

// An infotext pasted as text (from a web page, A1111's "Read generation parameters" button) -> the dict
// /sdapi/v1/png-info answers for a PNG: sd.infotext.parse_infotext's rules, sizes split into key-1/-2.
// null when the text has no settings line (at least three "Key: value" pairs on the last line).
export function parseInfotext(text) {
  const lines = text.trim().split("\n");
  const last = lines.pop();
  if ([...last.matchAll(PARAM)].length < 3) return null;
  let prompt = "";
  let negative = "";
  let inNegative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith(NEGATIVE)) [inNegative, line] = [true, line.slice(NEGATIVE.length).trim()];
    if (inNegative) negative += (negative ? "\n" : "") + line;
    else prompt += (prompt ? "\n" : "") + line;
  }
  const parameters = { Prompt: prompt, "Negative prompt": negative };
  for (const [, key, raw] of last.matchAll(PARAM)) {
    const value = unquote(raw.trim());
    const size = /^(\d+)x(\d+)$/.exec(value);
    if (size) Object.assign(parameters, { [`${key.trim()}-1`]: size[1], [`${key.trim()}-2`]: size[2] });
    else parameters[key.trim()] = value;
  }
  return parameters;
}
