// While a request runs: poll /sdapi/v1/progress (as A1111 clients do) for the bar, the step, the time
// left, and the live preview of the latents. The request carries its own id (A1111's force_task_id); our
// server then says where it stands in the queue (queue_position: 0 running, n: n jobs ahead), so the bar
// shows this request's progress, not another client's.

import { get } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;

function describe(state, answer) {
  const step = state?.sampling_step ?? 0;
  const total = state?.sampling_steps ?? 0;
  const parts = [];
  if (answer.textinfo) parts.push(answer.textinfo);
  if (total) parts.push(`step ${step}/${total}`);
  if (state?.job_count > 1 && state?.job_no !== undefined)
    parts.push(`batch ${state.job_no + 1}/${state.job_count}`);
  if (answer.eta_relative > 0) parts.push(`ETA ${Math.ceil(answer.eta_relative)} s`);
  return parts.join(" · ") || "waiting…";
}

// Start polling for task `idTask`; the returned function stops it. `onPreview(url)` gets each new preview.
export function watchProgress(idTask, onPreview) {
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
        const query = new URLSearchParams({ skip_current_image: "false", id_task: idTask });
        const answer = await get(`/sdapi/v1/progress?${query}`);
        if (!running) break;
        if (answer.queue_position > 0) {
          const ahead = answer.queue_position;
          text.textContent = `queued: ${ahead} job${ahead === 1 ? "" : "s"} ahead`;
          await new Promise((resolve) => setTimeout(resolve, POLL_MS));
          continue;
        }
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
