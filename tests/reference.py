"""The reference implementation (diffusers / transformers), built offline on given weights.

Nothing here touches a hub: models are constructed from explicit configs and receive an original-layout
(LDM) state dict through diffusers' own single-file converters.
"""

from __future__ import annotations

import torch

from conftest import REFERENCE_DIR


def reference_models(state: dict, dconf: dict) -> tuple:
    """(unet, vae, text_encoder) of diffusers/transformers holding `state`, converted by diffusers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = {k: v for k, v in dconf["unet"].items() if not k.startswith("_")}
    vae_cfg = {k: v for k, v in dconf["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):  # skip the reference's random init of 1B parameters
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_cfg), strict=True, assign=True)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_cfg), strict=True, assign=True)
    te_cfg = {k: v for k, v in dconf["text_encoder"].items() if k not in ("architectures", "torch_dtype")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    # transformers 5 dropped the `text_model.` level that the converter (and real SD1.5 files) keep.
    clip_state = {
        k.removeprefix("text_model."): v
        for k, v in sfu.convert_ldm_clip_checkpoint(state).items()
        if not k.endswith("position_ids")
    }
    text_encoder.load_state_dict(clip_state, strict=True)
    return tuple(m.eval().requires_grad_(False) for m in (unet, vae, text_encoder))


def reference_tokenizer():
    """transformers' CLIPTokenizer built offline from the reference vocab/merges files."""
    import json

    from transformers import CLIPTokenizer as HFCLIPTokenizer

    vocab = json.loads((REFERENCE_DIR / "clip-vocab.json").read_text(encoding="utf-8"))
    lines = (REFERENCE_DIR / "clip-merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    # transformers 5 ignores vocab_file/merges_file paths given as keywords: pass the tables themselves.
    merges = [tuple(line.split(" ")) for line in lines if line]
    return HFCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
