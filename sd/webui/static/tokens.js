// The "43/75" counter beside each prompt. The server counts (POST /sd/tokens: CLIP's BPE, embeddings,
// AND, prompt editing and BREAK, as A1111's counter); a server without that route gets an estimate from
// CLIP's pre-tokenizer pattern (one token per word or symbol run: low for rare long words), shown with "~".

import { post } from "./api.js";

const CHUNK = 75;
const WORDS = /'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/gu;
let exact = true; // false once the server has said it has no /sd/tokens

function estimate(text) {
  const plain = text.replace(/<[^<>:]+:[^<>]*>/g, ""); // <lora:...> tags are taken out of the prompt
  const count = Math.max(...plain.split(/\bAND\b/).map((part) => (part.match(WORDS) || []).length));
  return { token_count: count, max_length: Math.ceil(Math.max(count, 1) / CHUNK) * CHUNK };
}

async function count(text, steps, negative) {
  if (exact) {
    try {
      return await post("/sd/tokens", { text, steps, negative });
    } catch (error) {
      if (error.status !== 404 && error.status !== 405) throw error;
      exact = false;
    }
  }
  return estimate(text);
}

// Keep `label` showing the count of `textarea`; recount on input (debounced) and when `refresh()` is
// called (the steps changed, settings were restored). Answers that come back out of order are dropped.
export function tokenCounter(textarea, label, { negative = false, steps = () => 20 } = {}) {
  let timer = 0;
  let asked = 0;
  const refresh = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const ticket = ++asked;
      try {
        const { token_count, max_length } = await count(textarea.value, steps(), negative);
        if (ticket !== asked) return;
        label.textContent = `${exact ? "" : "~"}${token_count}/${max_length}`;
        label.classList.toggle("over", token_count > CHUNK);
      } catch (error) {
        if (ticket === asked) label.textContent = "?/75";
        console.warn(`token count: ${error.message}`);
      }
    }, 120);
  };
  textarea.addEventListener("input", refresh);
  refresh();
  return refresh;
}
