"""One fresh process, one measurement: cold start or one whole image, with the process's peak RSS.

bench.py runs `python _worker.py '<task json>'` and reads the JSON line this prints last. Imports happen
inside the functions so that each side pays for exactly its own: ours torch + sd, diffusers torch +
diffusers (+ transformers). Times are wall-clock seconds since the parent's `spawned` timestamp, so the
interpreter's own start-up is included.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "a watercolor painting of a lighthouse at dusk"


def _dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _load_ours(task: dict) -> Any:
    import sd

    return sd.load_models(task["checkpoint"], device=task["device"], dtype=_dtype(task["precision"]))


def _load_ours_openvino(task: dict) -> Any:
    from sd.backends.openvino import compile_checkpoint, precision_for

    # As `sd generate --backend openvino`: fp32 weights are read only for a component not converted yet.
    hint = precision_for(task["precision"])
    weights_id = Path(task["checkpoint"]).name  # as bench.py's in-process mode names the same IR
    return compile_checkpoint(task["checkpoint"], hint, task["openvino_cache"], weights_id=weights_id)


def _load_diffusers(task: dict) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        task["checkpoint"],
        config=task["config_folder"],
        local_files_only=True,
        torch_dtype=_dtype(task["precision"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(task["device"])


def _unet_step(task: dict, loaded: Any) -> None:
    """One CFG U-Net step (batch 2) at the task's latent size."""
    import torch

    device, side = task["device"], task["side"]
    dtype = _dtype("fp32" if side == "ours-openvino" else task["precision"])  # OpenVINO takes fp32 in
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, task["latent"], task["latent"], generator=gen).to(device, dtype)
    context = torch.randn(2, 77, task["context_dim"], generator=gen).to(device, dtype)
    timestep = torch.tensor([999.0], device=device)
    with torch.inference_mode():
        if side.startswith("ours"):
            loaded["diffusion"](latents, context, timestep)
        else:
            loaded.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)
    _sync(device)


def _image(task: dict, loaded: Any) -> None:
    """One txt2img image, 20 DPM++ 2M steps with CFG 7.5 (the same call bench.py times in-process)."""
    import torch

    size, steps = task["size"], task["steps"]
    if task["side"].startswith("ours"):
        from sd.pipeline import Pipeline

        pipe = Pipeline(loaded, device=task["device"])
        pipe.txt2img(PROMPT, width=size, height=size, steps=steps, cfg_scale=7.5, sampler="dpmpp_2m", seed=0)
    else:
        from diffusers import DPMSolverMultistepScheduler

        loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
        generator = torch.Generator().manual_seed(0)
        loaded(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=generator,
        )
    _sync(task["device"])


HIRES_SCALE, HIRES_STEPS, HIRES_STRENGTH = 2, 20, 0.5  # 20 x 0.5: 10 steps run at 1024²


def _hires(task: dict, loaded: Any) -> None:
    """A hires-fix image: txt2img at size², then img2img of its latents upscaled (bilinear) to 2 x size², in
    diffusers' way on both sides (ours: Pipeline.txt2img(enable_hr=True); diffusers: its two pipelines)."""
    import torch

    size, steps = task["size"], task["steps"]
    if task["side"].startswith("ours"):
        from sd.pipeline import Pipeline

        Pipeline(loaded, device=task["device"]).txt2img(
            PROMPT, width=size, height=size, steps=steps, cfg_scale=7.5, sampler="dpmpp_2m", seed=0,
            enable_hr=True, hr_scale=HIRES_SCALE, hr_upscaler="Latent", hr_second_pass_steps=HIRES_STEPS,
            denoising_strength=HIRES_STRENGTH,
        )  # fmt: skip
    else:
        import torch.nn.functional as F
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

        loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
        latents = loaded(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).images  # fmt: skip
        upscaled = F.interpolate(latents, scale_factor=HIRES_SCALE, mode="bilinear")
        img2img = StableDiffusionImg2ImgPipeline(**loaded.components)
        img2img.set_progress_bar_config(disable=True)
        img2img(
            PROMPT, image=upscaled, strength=HIRES_STRENGTH, num_inference_steps=HIRES_STEPS,
            guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    _sync(task["device"])


def _inpaint(task: dict, loaded: Any) -> None:
    """An inpainted image: a size² picture, its centred (size/2)² square repainted at strength 0.75, in
    diffusers' way on both sides (ours: Pipeline.inpaint, no mask blur; diffusers: its inpaint pipeline)."""
    import numpy as np
    import torch
    from PIL import Image

    size, steps = task["size"], task["steps"]
    y, x = np.mgrid[0:size, 0:size]
    image = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    if task["side"].startswith("ours"):
        from sd.pipeline import Pipeline

        Pipeline(loaded, device=task["device"]).inpaint(
            image, mask, PROMPT, strength=0.75, steps=steps, cfg_scale=7.5, sampler="dpmpp_2m", seed=0,
            mask_blur=0,
        )  # fmt: skip
    else:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline(**loaded.components)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe(
            PROMPT, image=image, mask_image=mask, height=size, width=size, strength=0.75,
            num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    _sync(task["device"])


def _big_decode(task: dict, loaded: Any) -> None:
    """One VAE decode of random latents to a size x size image, tiled above 1024² on both sides."""
    import torch

    size, device = task["size"], task["device"]
    shape = (1, task["latent_channels"], task["latent"], task["latent"])
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if task["side"].startswith("ours"):
            from sd.pipeline import Pipeline

            Pipeline(loaded, device=device).decode(latents)  # auto mode: tiles above 1024²
        else:
            vae = loaded.vae
            if size > 1024:
                vae.enable_tiling()
            vae.decode(latents.to(device, vae.dtype) / vae.config.scaling_factor, return_dict=False)
    _sync(device)


def peak_rss_gb() -> float:
    """This process's peak resident set size. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    (large) parent through fork and exec, so a small child would report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(task: dict) -> dict[str, Any]:
    spawned = task["spawned"]
    import torch

    torch.set_num_threads(task["threads"])

    phases = {"import": time.time() - spawned}
    load = {"ours": _load_ours, "ours-openvino": _load_ours_openvino, "diffusers": _load_diffusers}
    loaded = load[task["side"]](task)
    phases["load"] = time.time() - spawned - sum(phases.values())
    if task["task"] == "cold":
        _unet_step(task, loaded)
        phases["first U-Net step"] = time.time() - spawned - sum(phases.values())
    elif task["task"] == "big-decode":
        _big_decode(task, loaded)
        phases["decode"] = time.time() - spawned - sum(phases.values())
    elif task["task"] == "hires":
        _hires(task, loaded)
        phases["image"] = time.time() - spawned - sum(phases.values())
    elif task["task"] == "inpaint":
        _inpaint(task, loaded)
        phases["image"] = time.time() - spawned - sum(phases.values())
    else:
        _image(task, loaded)
        phases["image"] = time.time() - spawned - sum(phases.values())
    result: dict[str, Any] = {
        "total_s": time.time() - spawned,
        "phases": phases,
        "peak_rss_gb": peak_rss_gb(),
    }
    if task["device"].startswith("cuda"):
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
