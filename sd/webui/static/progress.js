// While a request runs: poll /sdapi/v1/progress (as A1111 clients do) for the bar, the step, the time
// left, a place in the queue when others are ahead, and the live preview of the latents.

import { get } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;

function describe(state, answer) {
  const step = state?.sampling_step ?? 0;
  const total = state?.sampling_steps ?? 0;
  const parts = [];
  if (answer.textinfo) parts.push(answer.textinfo);
  if (total) parts.push(`step ${step}/${total}`);
  if (state?.job_count > 1 && state?.job_no !== undefined) parts.push(`batch ${state.job_no + 1}/${state.job_count}`);
  if (answer.eta_relative > 0) parts.push(`ETA ${Math.ceil(answer.eta_relative)} s`);
  return parts.join(" · ") || "waiting…";
}

// Start polling; the returned function stops it. `onPreview(url)` gets each new preview image.
export function watchProgress(onPreview) {
  const box = $("progress");
  const bar = $("progress_bar");
  const text = $("progress_text");
  let running = true;
  let lastPreview = null;
  // What this job showed, for the browser tests: the fractions polled, and how many previews.
  const seen = [];
  let previews = 0;
  box.hidden = false;
  bar.style.width = "0%";
  text.textContent = "queued…";
  box.dataset.seen = "";
  box.dataset.previews = 0;

  (async () => {
    while (running) {
      try {
        const answer = await get("/sdapi/v1/progress?skip_current_image=false");
        if (!running) break;
        const fraction = Math.max(0, Math.min(1, Number(answer.progress) || 0));
        bar.style.width = `${(fraction * 100).toFixed(1)}%`;
        seen.push(fraction);
        box.dataset.seen = seen.map((f) => f.toFixed(3)).join(" ");
        text.textContent = describe(answer.state, answer);
        if (answer.current_image && answer.current_image !== lastPreview) {
          lastPreview = answer.current_image;
          box.dataset.previews = ++previews;
          const image = answer.current_image;
          onPreview(image.startsWith("data:") ? image : `data:image/png;base64,${image}`);
        }
      } catch (error) {
        text.textContent = `progress: ${error.message}`;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  })();

  return (finalText = "") => {
    running = false;
    bar.style.width = "100%";
    text.textContent = finalText;
  };
}
