"""Pydantic shapes of A1111's API (v1.10.1 modules/api/models.py): requests with A1111's fields and
defaults, and the answers its clients parse. They give validation (wrong types, NaN) and the /docs page;
what each field means for the image is sd.server.parse's job."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# NaN and infinity are refused everywhere (a NaN CFG scale would make a black image that looks like success);
# fields A1111 does not have are kept (model_extra) so that the answer can list them as ignored.
_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


class _Processing(BaseModel):
    """StableDiffusionProcessing's fields, as A1111's API generates them (every one optional)."""

    model_config = _CONFIG

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    sampler_index: str | None = Field("Euler", description="A1111's old name of sampler_name")
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    force_task_id: str | None = Field(
        None, description="the id /progress?id_task= and /internal/progress know"
    )
    infotext: str | None = Field(None, description="A1111 infotext whose settings fill the fields not given")
    way: str | None = Field(None, description='ours: "a1111" (default) or "diffusers"')
    clip_skip: int | None = Field(None, description="ours; A1111 clients set CLIP_stop_at_last_layers")


class Txt2ImgRequest(_Processing):
    """StableDiffusionTxt2ImgProcessingAPI."""

    enable_hr: bool | None = False
    denoising_strength: float | None = 0.75
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    firstpass_image: str | None = None


class Img2ImgRequest(_Processing):
    """StableDiffusionImg2ImgProcessingAPI."""

    init_images: list[Any] | None = None
    resize_mode: int | None = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | int | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False


class GenerationResponse(BaseModel):
    """TextToImageResponse / ImageToImageResponse."""

    images: list[str] | None = Field(None, description="base64 PNGs, each with its infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seeds, infotexts, warnings, ignored_fields, ...")


class _ExtrasRequest(BaseModel):
    """ExtrasBaseRequest: the Extras tab's upscale (sd.upscalers' built-in upscalers)."""

    model_config = _CONFIG

    resize_mode: int = Field(0, ge=0, le=1, description="0: upscale by upscaling_resize; 1: to _w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="face restoration: not available, 0 only")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="not available either, 0 only")
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description="None, Lanczos or Nearest (model upscalers are refused)")
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(_ExtrasRequest):
    image: str = Field("", description="base64 image (or a data URL)")


class FileData(BaseModel):
    data: str = Field(description="base64 image (or a data URL)")
    name: str


class ExtrasBatchImagesRequest(_ExtrasRequest):
    imageList: list[FileData]  # noqa: N815 (A1111's name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = Field(description="base64 PNG (or a data URL)")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None
    queue: list[dict[str, Any]] = Field(default_factory=list, description="ours: the waiting jobs, in order")
    queue_position: int | None = Field(None, description="ours: id_task's place in the queue (0: running)")


class InternalProgressRequest(BaseModel):
    """A1111's /internal/progress (what its own web page polls)."""

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_name: str
    filename: str


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscaleModeItem(BaseModel):
    name: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None
