"""The glue between the HTTP routes and the Pipeline: jobs, options, progress and listings.

Everything that touches the model runs on the queue's one worker thread (sd.server.jobs), so a model
switch or a VAE swap never lands in the middle of a job. Route handlers only read small state.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..controlnet import ControlUnit, load_controlnet
from ..controlnet.a1111 import fit_hint, hint_array
from ..hires import LATENT_UPSCALE_MODES
from ..images import save_png
from ..models import dtype_of
from ..params import GenerationParams
from ..pipeline import Pipeline, model_calls
from ..samplers import ALIASES, SAMPLERS
from ..samplers.a1111 import catalogue
from ..samplers.sigmas import SCHEDULE_TYPES
from ..upscalers import IMAGE_UPSCALERS
from . import catalog
from .catalog import Checkpoint
from .jobs import Job, JobInterruptedError, JobQueue
from .parse import CLIP_SKIP_OPTION, HARMLESS_OPTIONS, OPTIONS, BadRequestError, Request, check_options
from .preview import preview_base64

log = logging.getLogger("sd")
VAE_AUTOMATIC = ("Automatic", "None", "")


class Service:
    """The model, its queue and the server's A1111 options."""

    def __init__(
        self,
        pipe: Pipeline,
        way: str = "a1111",
        models_dir: str | Path | None = None,
        checkpoint: str | Path | None = None,
        loader: Callable[[Path], Pipeline] | None = None,
        flags: dict[str, Any] | None = None,
    ):
        """`models_dir`: where /sd-models lists checkpoints and sd_model_checkpoint finds them (A1111's
        layout: it, or its Stable-diffusion/); `checkpoint`: the file `pipe` came from; `loader`: how a
        switch loads another (default Pipeline.from_checkpoint)."""
        self.pipe = pipe
        self.way = way  # a request's default: A1111's way, or diffusers'
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.checkpoint = catalog.checkpoint_of(Path(checkpoint), hashed=True) if checkpoint else None
        self.loader = loader or (lambda path: Pipeline.from_checkpoint(path))
        self.flags = flags or {}
        self.options: dict[str, Any] = {}  # A1111 options set by POST /options (defaults elsewhere)
        self._controlnets: dict[Path, Any] = {}  # the latest ControlNet models read, by file
        self.queue = JobQueue()

    def close(self) -> None:
        self.queue.close()

    # --- generation ----------------------------------------------------------------------------------

    def submit(self, request: Request, kind: str) -> Job:
        """Queue a generation job; its future gives the A1111 answer (dict)."""
        job = Job(lambda job: self._generate(job, request), kind=kind)
        if request.task_id:
            job.id_task = request.task_id
        return self.queue.submit(job)

    def _generate(self, job: Job, request: Request) -> dict[str, Any]:
        job.batches = request.n_iter
        job.steps = model_calls(request.params, self.pipe.config.schedule)
        restore = self.checkpoint, self._vae_name()
        if request.checkpoint is not None:
            self.switch_checkpoint(request.checkpoint)
        if request.vae is not None:
            self.set_vae(request.vae)
        try:
            return self._run(job, request)
        except ValueError as error:  # what the pipeline refuses (e.g. a size its VAE cannot take)
            raise BadRequestError(
                str(error).splitlines()[0] if str(error) else type(error).__name__
            ) from None
        finally:
            if request.restore and request.checkpoint is not None and restore[0] is not None:
                self.switch_checkpoint(restore[0].title)
            if request.restore and request.vae is not None:
                self.set_vae(restore[1])

    def _run(self, job: Job, request: Request) -> dict[str, Any]:
        pipe = self.pipe

        def progress(step) -> None:
            # counted over the whole batch: a hires fix's second pass goes on from the first's count. As
            # A1111's, previews and an interrupted job's images are the latest clean-image prediction.
            latest = step.latents if step.denoised is None else step.denoised
            job.step, job.latents = min(job.step + 1, job.steps), latest
            job.preview_id += 1
            if job.interrupted.is_set() or job.skipped.is_set():
                raise JobInterruptedError(latest)

        warnings = _WarningCollector(threading.get_ident())
        log.addHandler(warnings)
        backtrack = pipe.comma_backtrack
        if request.comma_backtrack is not None:
            pipe.comma_backtrack = request.comma_backtrack
        images: list[Image.Image] = []
        seeds: list[int] = []
        subseeds: list[int] = []
        control = self._control_units(request)
        try:
            for iteration in range(request.n_iter):
                if job.interrupted.is_set():
                    break
                job.batch, job.step = iteration, 0
                params = _batch_params(request, iteration)
                try:
                    batch = pipe.run(params, request.image, request.batch_size, request.eta, progress,
                                     mask=request.mask, control=control)  # fmt: skip
                except JobInterruptedError as stop:  # A1111 keeps what the sampler had reached
                    if job.abandoned or stop.latents is None:
                        break
                    batch = self._partial(params, stop.latents, request.batch_size)
                    job.skipped.clear()
                images += batch
                for image in batch:
                    parsed = GenerationParams.from_text(image.info["parameters"])
                    seeds.append(parsed.seed)
                    subseeds.append(parsed.subseed if parsed.subseed is not None else -1)
        finally:
            log.removeHandler(warnings)
            pipe.comma_backtrack = backtrack
        answer = self._answer(job, request, images, seeds, subseeds, warnings.messages)
        if images and request.send_images:  # A1111's ControlNet extension: each unit's hint as used, after
            answer["images"] += [_png_base64(m) for m in detected_maps(request, images[0].size)]
        return answer

    def controlnet_dir(self) -> Path | None:
        """Where ControlNet units' models are: <models folder>/ControlNet (A1111's models/ControlNet)."""
        return None if self.models_dir is None else self.models_dir / "ControlNet"

    def _control_units(self, request: Request) -> list[ControlUnit]:
        """The request's ControlNet units with their models read (the latest ones kept for the next job)."""
        if not request.control:
            return []
        dtype = dtype_of(self.pipe.models["diffusion"])
        wanted = {spec.path for spec in request.control}
        self._controlnets = {p: m for p, m in self._controlnets.items() if p in wanted}  # free the others
        for path in wanted - set(self._controlnets):
            self._controlnets[path] = load_controlnet(path, self.pipe.config.unet, dtype)
        return [
            ControlUnit(self._controlnets[s.path], s.image, s.weight, s.start, s.end, s.mode, s.resize_mode)
            for s in request.control
        ]

    def _partial(self, params: GenerationParams, latents, count: int) -> list[Image.Image]:
        """Images of an interrupted batch: its latest clean-image prediction, decoded with the batch's
        parameters."""
        pipe = self.pipe
        if params.width is None or params.height is None:  # as Pipeline.run resolves them
            down = pipe.config.vae.downscale
            params = replace(params, width=latents.shape[-1] * down, height=latents.shape[-2] * down)
        pixels = pipe.decode(latents, truncate=params.a1111)
        # Pipeline's own per-image parameters and infotext, so a partial PNG replays like a whole one.
        return [
            pipe._with_params(Image.fromarray(p), pipe._image_params(params, i, count))
            for i, p in enumerate(pixels[:count])
        ]

    def _answer(self, job, request, images, seeds, subseeds, warnings) -> dict[str, Any]:
        params = request.params
        sampler_name = (
            params.sampler if params.a1111 else params.sampler + (" karras" if params.karras else "")
        )
        first = images[0] if images else None
        infotexts = [image.info.get("parameters", "") for image in images]
        info = {
            "prompt": params.prompt,
            "all_prompts": [params.prompt] * len(images),
            "negative_prompt": params.negative_prompt,
            "all_negative_prompts": [params.negative_prompt] * len(images),
            "seed": seeds[0] if seeds else params.seed,
            "all_seeds": seeds,
            "subseed": subseeds[0] if subseeds else -1,
            "all_subseeds": subseeds,
            "subseed_strength": params.subseed_strength,
            "width": first.width if first else params.width,
            "height": first.height if first else params.height,
            "sampler_name": sampler_name,
            "scheduler": params.schedule if params.a1111 else None,
            "cfg_scale": params.cfg_scale,
            "steps": params.steps,
            "batch_size": request.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": self.pipe.model_name,
            "sd_model_hash": self.pipe.model_hash,
            "sd_vae_name": self._vae_name() if self._vae_name() not in VAE_AUTOMATIC else None,
            "sd_vae_hash": getattr(self.pipe, "vae_hash", None),
            "seed_resize_from_w": params.seed_resize_from[0] if params.seed_resize_from else -1,
            "seed_resize_from_h": params.seed_resize_from[1] if params.seed_resize_from else -1,
            "denoising_strength": params.strength,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.queued_at)),
            "clip_skip": params.clip_skip,
            # A1111: the model takes the mask and masked image as input (the 9-channel inpainting U-Net)
            "is_using_inpainting_conditioning": self.pipe.config.unet.in_channels == 9,
            "version": "sd",
            "interrupted": job.interrupted.is_set(),
            "warnings": warnings,
            "ignored_fields": list(request.ignored),
        }
        return {
            "images": [_png_base64(image) for image in images] if request.send_images else [],
            "info": json.dumps(info),
        }

    # --- progress and control ----------------------------------------------------------------------

    def progress(self, skip_current_image: bool = False, id_task: str | None = None) -> dict[str, Any]:
        """A1111's /sdapi/v1/progress, with the queue: `queue` (waiting jobs in order) and, for `id_task`,
        `queue_position` (0: running, n: n-th in line)."""
        job = self.queue.current
        waiting = self.queue.waiting()
        queue = [{"id_task": j.id_task, "job": j.kind, "position": n} for n, j in enumerate(waiting, 1)]
        position = self.queue.position(id_task) if id_task else None
        if job is None or not job.started:
            state = _state(None, len(waiting))
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": None, "current_task": None, "queue": queue,
                    "queue_position": position}  # fmt: skip
        fraction = job.fraction
        elapsed = time.monotonic() - job.started
        progress = min(1.0, 0.01 + fraction)  # A1111 starts at 0.01
        eta = elapsed / progress - elapsed
        latents = job.latents
        image = preview_base64(latents) if latents is not None and not skip_current_image else None
        return {"progress": progress, "eta_relative": eta, "state": _state(job, len(waiting)),
                "current_image": image, "textinfo": job.textinfo, "current_task": job.id_task,
                "queue": queue, "queue_position": position}  # fmt: skip

    def internal_progress(self, id_task: str | None, id_live_preview: int = -1, live_preview: bool = True):
        """A1111's /internal/progress (what its web page polls): active, queued, completed, progress, eta,
        live_preview, id_live_preview, textinfo; plus our queue_position."""
        job = self.queue.current
        position = self.queue.position(id_task) if id_task else None
        active = job is not None and job.id_task == id_task
        completed = id_task is not None and id_task in self.queue.finished
        queued = position is not None and position > 0
        answer: dict[str, Any] = {"active": active, "queued": queued, "completed": completed,
                                  "progress": None, "eta": None, "live_preview": None,
                                  "id_live_preview": id_live_preview, "queue_position": position,
                                  "textinfo": "In queue..." if queued else "Waiting..."}  # fmt: skip
        if active and job is not None and job.started:
            fraction = max(job.fraction, 1e-6)
            elapsed = time.monotonic() - job.started
            answer.update(progress=job.fraction, eta=elapsed / fraction - elapsed, textinfo=job.textinfo)
            if live_preview and job.latents is not None and job.preview_id != id_live_preview:
                answer.update(live_preview="data:image/png;base64," + preview_base64(job.latents),
                              id_live_preview=job.preview_id)  # fmt: skip
        return answer

    def interrupt(self) -> None:
        """Stop the running job: it answers with what it has (A1111)."""
        job = self.queue.current
        if job is not None:
            job.interrupted.set()

    def skip(self) -> None:
        """End the running job's current batch (its partial images kept) and go on with the next."""
        job = self.queue.current
        if job is not None:
            job.skipped.set()

    # --- listings ----------------------------------------------------------------------------------

    def samplers(self) -> list[dict[str, Any]]:
        """A1111's sampler set (its names, aliases and options), then ours (diffusers' way)."""
        a1111 = [
            {"name": label, "aliases": aliases, "options": {"scheduler": schedule} if schedule else {}}
            for label, aliases, schedule, _ in catalogue()
        ]
        ours = [
            {"name": name, "aliases": [alias for alias, target in ALIASES.items() if target == name],
             "options": {"description": description, "way": "diffusers"}}
            for name, description in SAMPLERS.items()
        ]  # fmt: skip
        return a1111 + ours

    def schedulers(self) -> list[dict[str, Any]]:
        """A1111's schedule types, as its /sdapi/v1/schedulers lists them."""
        kinds = [("automatic", "Automatic", None)] + [
            (k, t.label, t.default_rho) for k, t in SCHEDULE_TYPES.items()
        ]
        return [
            {"name": key, "label": label, "aliases": None, "default_rho": -1 if rho is None else rho,
             "need_inner_model": False}
            for key, label, rho in kinds
        ]  # fmt: skip

    def _current(self) -> Checkpoint:
        if self.checkpoint is not None:
            return self.checkpoint
        name = self.pipe.model_name or "model"  # a Pipeline made in Python: no file
        return Checkpoint(Path(name), name, self.pipe.model_hash, None)

    def sd_models(self) -> list[dict[str, Any]]:
        """The loaded checkpoint, then the others of the models folder."""
        current = self._current()
        others = [
            c for c in catalog.checkpoints(self.models_dir) if c.path.resolve() != current.path.resolve()
        ]
        return [current.item()] + [c.item() for c in others]

    def vae_dir(self) -> Path | None:
        folder = getattr(self.pipe, "vae_dir", None)
        if folder is None and self.models_dir is not None:
            folder = self.models_dir / "VAE"
        return Path(folder) if folder is not None else None

    def sd_vae(self) -> list[dict[str, str]]:
        return catalog.vae_items(self.vae_dir())

    def loras(self) -> list[dict[str, Any]]:
        return catalog.lora_items(self.pipe.lora_dir)

    def embeddings(self) -> dict[str, Any]:
        return catalog.embedding_items(self.pipe.embeddings)

    def get_options(self) -> dict[str, Any]:
        """A1111's options: the ones that change images (their values now), the loaded model and VAE."""
        defaults = {name: default for name, (_, default, _) in OPTIONS.items()}
        current = self._current()
        return {**defaults, **HARMLESS_OPTIONS, **self.options, "sd_model_checkpoint": current.title,
                "sd_checkpoint_hash": current.sha256, "sd_vae": self._vae_name()}  # fmt: skip

    def _vae_name(self) -> str:
        file = getattr(self.pipe, "vae_file", None)
        folder = self.vae_dir()
        if file is None:
            return "Automatic"
        file = Path(file)
        try:
            return file.relative_to(folder.resolve()).as_posix() if folder is not None else file.name
        except ValueError:
            return file.name

    def set_options(self, options: dict[str, Any]) -> None:
        """POST /options: check types, then switch the model / VAE (on the worker, between jobs) and keep
        the rest (options we do not know are kept and do nothing, as A1111 ignores them)."""
        check_options(options)
        if "sd_model_checkpoint" in options:
            self.find_checkpoint(options["sd_model_checkpoint"])  # 400 now, before queueing
        vae = options.get("sd_vae")
        if vae is not None and vae not in VAE_AUTOMATIC:
            self._check_vae(vae)
        rest = {k: v for k, v in options.items() if k not in ("sd_model_checkpoint", "sd_vae")}
        self.options.update(rest)

    def model_job(self, options: dict[str, Any]) -> Job | None:
        """The job that applies POST /options' sd_model_checkpoint and sd_vae, or None if nothing to do."""
        checkpoint, vae = options.get("sd_model_checkpoint"), options.get("sd_vae")
        if checkpoint is None and vae is None:
            return None

        def run(job: Job) -> None:
            if checkpoint is not None:
                self.switch_checkpoint(checkpoint)
            if vae is not None:
                self.set_vae(vae)

        return self.queue.submit(Job(run, kind="options"))

    def refresh_embeddings(self) -> Job:
        """Read the embeddings folder again, on the worker (a running job keeps the ones it started with)."""
        return self.queue.submit(Job(lambda job: self.pipe.reload_embeddings(), kind="refresh-embeddings"))

    def find_checkpoint(self, wanted: str) -> Checkpoint:
        current = self._current()
        if current.matches(wanted):
            return current
        for found in catalog.checkpoints(self.models_dir):
            if found.matches(wanted) or found.matches(wanted.rsplit(" [", 1)[0]):
                return found
        raise BadRequestError(f"model {wanted!r} not found")

    def switch_checkpoint(self, wanted: str) -> None:
        """Load another checkpoint in place of this one (worker thread only); the folders and settings of
        the old pipeline carry over."""
        found = self.find_checkpoint(wanted)
        if found == self._current():  # already loaded
            return
        print(f"loading {found.path} ...", flush=True)
        old = self.pipe
        try:
            new = self.loader(found.path)
        except (OSError, ValueError) as error:
            raise BadRequestError(f"cannot load {found.name}: {error}".splitlines()[0]) from None
        for name in ("lora_dir", "vae_tiling", "vae_dir"):
            if hasattr(old, name):
                setattr(new, name, getattr(old, name))
        self.pipe = new
        self.checkpoint = catalog.checkpoint_of(found.path, hashed=True)
        self.checkpoint = replace(self.checkpoint, name=found.name)

    def _check_vae(self, vae: str) -> None:
        if not hasattr(self.pipe, "set_vae"):
            raise BadRequestError(f"sd_vae {vae!r}: swapping the VAE is not supported yet; use Automatic")
        listed = any(
            item["model_name"] == vae or Path(item["filename"]).name == vae for item in self.sd_vae()
        )
        if not listed and not Path(vae).exists():
            raise BadRequestError(f"sd_vae {vae!r}: no such VAE in {self.vae_dir()}")

    def set_vae(self, vae: str) -> None:
        if vae in VAE_AUTOMATIC and not hasattr(self.pipe, "set_vae"):
            return
        if vae not in VAE_AUTOMATIC:
            self._check_vae(vae)
        if getattr(self.pipe, "vae_dir", None) is None and self.vae_dir() is not None:
            self.pipe.vae_dir = self.vae_dir()
        try:
            self.pipe.set_vae(None if vae in VAE_AUTOMATIC else vae)
        except (OSError, ValueError) as error:
            raise BadRequestError(str(error).splitlines()[0]) from None

    def upscalers(self) -> list[dict[str, Any]]:
        """A1111's upscalers that need no model file (the hires fix runs them); model ones are refused."""
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in IMAGE_UPSCALERS]  # fmt: skip

    def latent_upscale_modes(self) -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    def cmd_flags(self) -> dict[str, Any]:
        return {"api": True, "nowebui": False, **self.flags}


def detected_maps(request: Request, size: tuple[int, int]) -> list[Image.Image]:
    """The hints as the units used them, at the image's size (and, with the hires fix, the first pass's
    after the final one), for the units that keep them (save_detected_map)."""
    params = request.params
    sizes = [size]
    if params.enable_hr:
        sizes.append((params.width, params.height))
    return [
        Image.fromarray(fit_hint(hint_array(spec.image), width, height, spec.resize_mode))
        for spec in request.control
        if spec.save_map
        for width, height in sizes
    ]


def _state(job: Job | None, waiting: int) -> dict[str, Any]:
    """A1111's shared.state.dict(), and the number of jobs waiting behind it."""
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                "queue_size": waiting}  # fmt: skip
    return {"skipped": job.skipped.is_set(), "interrupted": job.interrupted.is_set(),
            "stopping_generation": False, "job": job.kind, "job_count": job.batches,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.queued_at)),
            "job_no": job.batch, "sampling_step": job.step, "sampling_steps": job.steps,
            "queue_size": waiting}  # fmt: skip


def _batch_params(request: Request, iteration: int) -> GenerationParams:
    """The parameters of batch `iteration` of a request."""
    params = request.params
    if not params.a1111:  # a seed per batch: seed, seed + 1, ... (one generator per batch)
        return replace(params, seed=(params.seed + iteration) % 2**32)
    return params.a1111_image(iteration * request.batch_size, wrap=2**32)  # every image of the request


class _WarningCollector(logging.Handler):
    """The warnings one job's thread logs (the answer's `warnings`)."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.WARNING)
        self.thread = thread
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    save_png(image, buffer, image.info.get("parameters"))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = ["CLIP_SKIP_OPTION", "Service"]
