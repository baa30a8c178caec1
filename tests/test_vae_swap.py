"""The VAE swap (sd.vae_swap, Pipeline.set_vae, --vae): standalone VAE files in the original and diffusers
layouts put in place of the checkpoint's VAE, the original weights restored bit for bit, `VAE hash` and
`VAE` in the PNG as A1111 writes them.

Reference: diffusers' AutoencoderKL built offline from the tiny config, holding the file's weights;
decoding the same latents agrees up to fp32 rounding (max abs diff <= 1e-5 * max(1, max |reference|)).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd.config import SD15, TINY
from sd.keymap import VAE_PREFIX, diffusers_configs
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.testing import ldm_state_dict, random_models
from sd.vae_swap import VAEFileError, read_vae, vae_files

from conftest import load_reference

RTOL = 1e-5


def _vae_state(seed: int) -> dict[str, torch.Tensor]:
    """An original-layout VAE file's tensors (no first_stage_model. prefix) for the tiny model."""
    state = ldm_state_dict(random_models(TINY, seed=seed))
    return {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}


def _pipe(seed: int = 1) -> Pipeline:
    return Pipeline(random_models(TINY, seed=seed))


def _weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.clone() for c in ("encoder", "decoder") for k, v in pipe.models[c].state_dict().items()
    }


def _decode(pipe: Pipeline) -> torch.Tensor:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.models["decoder"](latents)


def test_original_layout_file_swaps_in_and_restores_bit_for_bit(tmp_path) -> None:
    state = _vae_state(seed=7)
    path = tmp_path / "ft-mse.safetensors"
    save_file(state, str(path))
    pipe = _pipe()
    before, image_before = _weights(pipe), _decode(pipe)
    pipe.set_vae(path)
    donor = random_models(TINY, seed=7)
    for name in ("encoder", "decoder"):
        for key, value in donor[name].state_dict().items():
            assert torch.equal(pipe.models[name].state_dict()[key], value), key
    assert not torch.equal(_decode(pipe), image_before)
    pipe.set_vae(None)
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_decode(pipe), image_before)


def test_ckpt_with_prefix_loss_and_ema_keys_loads(tmp_path) -> None:
    """A1111's load_vae_dict drops loss.* and the EMA counters; .ckpt files wrap the dict in state_dict."""
    state = {VAE_PREFIX + k: v for k, v in _vae_state(seed=3).items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)
    state["model_ema.decay"] = torch.tensor(0.999)
    path = tmp_path / "anything.vae.pt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    states = read_vae(path, TINY)
    donor = random_models(TINY, seed=3)
    assert set(states["decoder"]) == set(donor["decoder"].state_dict())
    assert torch.equal(states["decoder"]["post_quant_conv.weight"], donor["decoder"].post_quant_conv.weight)


def _diffusers_vae(seed: int):
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in diffusers_configs(TINY)["vae"].items() if not k.startswith("_")}
    torch.manual_seed(seed)
    vae = AutoencoderKL(**cfg).eval()
    with torch.no_grad():  # no zero-initialised layer may hide a mapping mistake
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae, cfg


@pytest.mark.parametrize("as_folder", [False, True])
def test_diffusers_layout_decodes_as_diffusers(tmp_path, as_folder: bool) -> None:
    import json

    vae, cfg = _diffusers_vae(seed=11)
    if as_folder:
        path = tmp_path / "sd-vae-ft-mse"
        path.mkdir()
        save_file(vae.state_dict(), str(path / "diffusion_pytorch_model.safetensors"))
        (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfg}))
        assert vae_files(tmp_path) == [path]
    else:
        path = tmp_path / "diffusers-vae.safetensors"
        save_file(vae.state_dict(), str(path))
    pipe = _pipe()
    pipe.set_vae(path)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pipe.models["decoder"](latents)
        ref = vae.decode(latents / TINY.vae.scaling_factor).sample
        ours_mean = pipe.models["encoder"].encode(ref.clamp(-1, 1)).mean
        ref_mean = vae.encode(ref.clamp(-1, 1)).latent_dist.mean
    for what, a, b in (("decode", ours, ref), ("encode", ours_mean, ref_mean)):
        diff = (a - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        print(f"{what}: max abs diff {diff:.3g} (scale {scale:.3g})")
        assert diff <= RTOL * scale, what


def test_sd15_vae_file_maps_all_248_tensors() -> None:
    """The real file's layout: the checkpoint's first_stage_model.* keys without the prefix."""
    keys = load_reference("sd15-ldm-checkpoint.json")["keys"]
    shapes = {k.removeprefix(VAE_PREFIX): v["shape"] for k, v in keys.items() if k.startswith(VAE_PREFIX)}
    assert len(shapes) == 248
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/vae-ft-mse-840000-ema-pruned.safetensors"
        save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, path)
        states = read_vae(path, SD15)
    assert sum(len(s) for s in states.values()) == 248


def test_png_records_vae_hash_and_name(tmp_path) -> None:
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(_vae_state(seed=7), str(path))
    pipe = _pipe()
    pipe.vae_dir = tmp_path
    pipe.set_vae("vae-ft-mse-840000-ema-pruned")  # by stem, found in vae_dir
    image = pipe.txt2img("a cat", width=64, height=64, steps=2, seed=1)[0]
    text = image.info["parameters"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert "Model hash" not in text or text.index("VAE hash") > text.index("Size")
    assert f"VAE hash: {digest}, VAE: vae-ft-mse-840000-ema-pruned.safetensors" in text
    params = GenerationParams.from_text(text)
    assert (params.vae, params.vae_hash) == ("vae-ft-mse-840000-ema-pruned.safetensors", digest)
    assert "VAE" not in params.unhonoured
    pipe.set_vae("None")
    assert "VAE" not in pipe.txt2img("a cat", width=64, height=64, steps=2, seed=1)[0].info["parameters"]


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(p)), "a LoRA"),
        (
            lambda p: save_file({"model.diffusion_model.out.0.weight": torch.zeros(1)}, str(p)),
            "full checkpoint",
        ),
        (lambda p: save_file({"encoder.conv_in.weight": torch.zeros(1, 1, 3, 3)}, str(p)), "shape"),
        (lambda p: save_file({"something.else": torch.zeros(1)}, str(p)), "no VAE weights recognised"),
        (lambda p: save_file(dict(list(_vae_state(1).items())[:-3]), str(p)), "missing 3 keys"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, make, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(VAEFileError) as error:
        _pipe().set_vae(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_malicious_pt_never_runs_code(tmp_path, capsys) -> None:
    path = tmp_path / "evil.vae.pt"
    torch.save({"state_dict": {}}, path)
    with zipfile.ZipFile(path) as z:  # swap in a pickle that calls print when unpickled
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps(_Boom(), protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(VAEFileError):
        read_vae(path, TINY)
    assert "pwned" not in capsys.readouterr().out


def test_unknown_name_says_where_it_looked(tmp_path) -> None:
    pipe = _pipe()
    pipe.vae_dir = tmp_path
    with pytest.raises(VAEFileError, match=f"nowhere: no such VAE file in {tmp_path}"):
        pipe.set_vae("nowhere")


def test_cli_vae_option_and_png_replay(tmp_path, capsys, monkeypatch) -> None:
    from sd.cli import main
    from sd.images import read_png_parameters
    from sd.weights import save_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_HOME", str(tmp_path / "sd-home"))
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(random_models(TINY, seed=5), ckpt, config=TINY)
    folder = tmp_path / "VAE"
    folder.mkdir()
    save_file(_vae_state(seed=9), str(folder / "mse.safetensors"))
    fast = ["--ckpt", str(ckpt), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]

    def generate(*argv: str) -> tuple[int, str, str]:
        code = main(["generate", *argv, *fast])
        out, err = capsys.readouterr()
        return code, out.strip(), err

    code, swapped, err = generate("a cat", "--vae", str(folder / "mse.safetensors"), "-o", "a.png")
    assert code == 0, err
    assert "VAE: mse.safetensors" in read_png_parameters(swapped)
    code, plain, err = generate("a cat", "-o", "b.png")
    assert code == 0, err
    code, replayed, err = generate("--from-png", swapped, "--vae-dir", str(folder), "-o", "c.png")
    assert code == 0, err
    pixels = [np.asarray(Image.open(p)).tobytes() for p in (swapped, plain, replayed)]
    assert pixels[0] == pixels[2] != pixels[1]
    code, _, err = generate("--from-png", swapped, "-o", "d.png")  # no VAE folder: said, then made anyway
    assert code == 0 and "not in the VAE folder" in err
    code, _, err = generate("a cat", "--vae", "nowhere.safetensors")
    assert code != 0 and "VAE file not found: nowhere.safetensors" in err
    assert len(err.strip().splitlines()) == 1


def test_openvino_decodes_with_the_swapped_vae(tmp_path) -> None:
    pytest.importorskip("openvino")
    from sd.backends.openvino import compile_checkpoint
    from sd.weights import save_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(random_models(TINY, seed=1), ckpt, config=TINY)
    path = tmp_path / "mse.safetensors"
    save_file(_vae_state(seed=7), str(path))
    eager = Pipeline.from_checkpoint(ckpt)
    converted = Pipeline(compile_checkpoint(ckpt, "f32", tmp_path / "ov"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = converted.models["decoder"](latents)
        for pipe in (eager, converted):
            pipe.set_vae(path)
        want, got = eager.models["decoder"](latents), converted.models["decoder"](latents)
        converted.set_vae(None)
        back = converted.models["decoder"](latents)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    assert not torch.allclose(got, own) and torch.equal(back, own)
