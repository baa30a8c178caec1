// The server's routes, as any A1111 API client calls them (plus /sd/tokens, ours).

async function call(path, options = {}) {
  const answer = await fetch(path, options);
  const text = await answer.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { detail: text };
  }
  if (!answer.ok) {
    // FastAPI's validation errors are a list; A1111's own errors a string in detail or error.
    const detail = body?.detail ?? body?.error ?? answer.statusText;
    const line = Array.isArray(detail)
      ? detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
      : String(detail);
    const error = new Error(`${answer.status}: ${line}`);
    error.status = answer.status;
    throw error;
  }
  return body;
}

export const get = (path) => call(path);

export const post = (path, body) =>
  call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body ?? {}),
  });

// A route the server may lack (an older server, or one without LoRA support): its fallback instead.
export async function getOr(path, fallback) {
  try {
    return await get(path);
  } catch (error) {
    console.warn(`${path}: ${error.message}`);
    return fallback;
  }
}

// "data:image/png;base64,..." -> the base64 text A1111's routes take (they also take the data URL).
export const base64Of = (dataUrl) => dataUrl.slice(dataUrl.indexOf(",") + 1);

export const readAsDataUrl = (file) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
