// img2img's inpainting mask, painted over the init image as in A1111's Inpaint tab. The mask itself is a
// canvas at the init image's own pixel size (white strokes on transparent), so what is sent matches the
// image pixel for pixel whatever size the page shows it at; the canvas on screen is that mask tinted and
// half transparent over the image. History: one entry per stroke (or uploaded mask), replayed for Undo.

import { readAsDataUrl } from "./api.js";

const $ = (id) => document.getElementById(id);
const editor = {
  mask: null, // canvas, the init image's size: alpha = how much to repaint
  history: [], // {points, width, erase} strokes and {image} uploaded masks, oldest first
  stroke: null, // the stroke being drawn
  pending: false, // a screen redraw is scheduled
  source: null, // the init image's data URL
};

export const painting = () => $("paint_mask").checked;

// Anything painted (a stroke erased to nothing, or an all-black upload, is nothing).
export function hasMask() {
  if (!editor.mask) return false;
  const { data } = maskContext().getImageData(0, 0, editor.mask.width, editor.mask.height);
  for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
  return false;
}

// The mask as A1111's img2img takes it: a PNG data URL, the init image's size, white = repaint.
export function exportMask() {
  if (!editor.mask) return null;
  const out = sizedCanvas(editor.mask.width, editor.mask.height);
  const context = out.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage(editor.mask, 0, 0);
  return out.toDataURL("image/png");
}

// A new init image: an empty mask at its size, the painting stage at its aspect ratio.
export async function setMaskImage(dataUrl) {
  editor.source = dataUrl;
  const image = await loadImage(dataUrl);
  if (editor.source !== dataUrl) return; // another image was chosen while this one loaded
  const { naturalWidth: width, naturalHeight: height } = image;
  editor.mask = sizedCanvas(width, height);
  editor.history = [];
  editor.stroke = null;
  const screen = $("mask_canvas");
  [screen.width, screen.height] = [width, height];
  $("mask_image").src = dataUrl;
  $("mask_stage").style.setProperty("--ratio", `${width} / ${height}`);
  $("mask_panel").hidden = false;
  redraw();
}

export function bindMaskEditor() {
  $("paint_mask").addEventListener("change", showPainting);
  $("mask_undo").addEventListener("click", () => {
    editor.history.pop();
    replay();
  });
  $("mask_clear").addEventListener("click", () => {
    editor.history = [];
    replay();
  });
  $("mask_file").addEventListener("change", uploadMask);
  const screen = $("mask_canvas");
  screen.addEventListener("pointerdown", startStroke);
  screen.addEventListener("pointermove", continueStroke);
  for (const type of ["pointerup", "pointercancel"]) screen.addEventListener(type, endStroke);
  showPainting();
}

function showPainting() {
  $("mask_fields").hidden = !painting();
  // The init image then shows (large) under the mask; its drop box shrinks to a thumbnail.
  $("img2img_panel").classList.toggle("painting", painting());
}

// --- strokes -------------------------------------------------------------------------------------------

// A pointer position in mask pixels, and the brush diameter (set in screen pixels, as it looks).
function maskPoint(event) {
  const box = event.target.getBoundingClientRect();
  const scale = editor.mask.width / box.width;
  return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale };
}

function startStroke(event) {
  if (!editor.mask || event.button !== 0) return;
  event.preventDefault();
  event.target.setPointerCapture(event.pointerId); // the stroke goes on when the pointer leaves the image
  const { x, y, scale } = maskPoint(event);
  const erase = document.querySelector('input[name="mask_tool"]:checked').value === "eraser";
  editor.stroke = { points: [{ x, y }], width: Number($("brush_size").value) * scale, erase };
  editor.history.push(editor.stroke);
  drawStroke(maskContext(), editor.stroke);
  redraw();
}

function continueStroke(event) {
  const stroke = editor.stroke;
  if (!stroke) return;
  const { x, y } = maskPoint(event);
  const last = stroke.points[stroke.points.length - 1];
  stroke.points.push({ x, y });
  drawStroke(maskContext(), { ...stroke, points: [last, { x, y }] }); // only the new segment
  redraw();
}

function endStroke() {
  editor.stroke = null;
}

function drawStroke(context, { points, width, erase }) {
  context.save();
  context.globalCompositeOperation = erase ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = "white";
  context.lineWidth = width;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  if (points.length === 1) {
    context.arc(points[0].x, points[0].y, width / 2, 0, 2 * Math.PI); // a click paints a dot
    context.fill();
  } else {
    context.moveTo(points[0].x, points[0].y);
    for (const { x, y } of points.slice(1)) context.lineTo(x, y);
    context.stroke();
  }
  context.restore();
}

// The mask again from its history (after Undo, Clear, an upload).
function replay() {
  const context = maskContext();
  context.clearRect(0, 0, editor.mask.width, editor.mask.height);
  for (const entry of editor.history) {
    if (entry.image) {
      context.clearRect(0, 0, editor.mask.width, editor.mask.height); // an upload replaces what was there
      context.drawImage(entry.image, 0, 0);
    } else {
      drawStroke(context, entry);
    }
  }
  redraw();
}

// --- an uploaded mask ----------------------------------------------------------------------------------

// A black/white image, stretched to the init image's size. As the server reads a mask (sd.inpaint's
// load_mask, A1111's): one with any transparency is its alpha channel, any other its brightness.
async function uploadMask() {
  const file = $("mask_file").files[0];
  $("mask_file").value = ""; // the same file chosen again is a change too
  if (!file || !editor.mask) return;
  const image = await loadImage(await readAsDataUrl(file));
  const { width, height } = editor.mask;
  const canvas = sizedCanvas(width, height);
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, width, height);
  const pixels = context.getImageData(0, 0, width, height);
  const data = pixels.data;
  let transparent = false;
  for (let i = 3; i < data.length && !transparent; i += 4) transparent = data[i] < 255;
  for (let i = 0; i < data.length; i += 4) {
    const brightness = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
    data[i + 3] = transparent ? data[i + 3] : Math.round(brightness);
    data[i] = data[i + 1] = data[i + 2] = 255;
  }
  context.putImageData(pixels, 0, 0);
  editor.history.push({ image: canvas });
  replay();
}

// --- the screen ----------------------------------------------------------------------------------------

// The mask tinted with the page's accent colour (the canvas is half transparent in style.css), at most
// once a frame however fast the pointer moves.
function redraw() {
  if (editor.pending) return;
  editor.pending = true;
  requestAnimationFrame(() => {
    editor.pending = false;
    const screen = $("mask_canvas");
    const context = screen.getContext("2d");
    context.globalCompositeOperation = "copy";
    context.drawImage(editor.mask, 0, 0);
    context.globalCompositeOperation = "source-in";
    context.fillStyle = getComputedStyle(screen).getPropertyValue("--mask-colour").trim() || "#e8590c";
    context.fillRect(0, 0, screen.width, screen.height);
  });
}

function maskContext() {
  return editor.mask.getContext("2d", { willReadFrequently: true });
}

function sizedCanvas(width, height) {
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [width, height];
  return canvas;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("not an image the browser can read"));
    image.src = url;
  });
}
