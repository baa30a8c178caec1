"""The samplers: one short generator function each, yielding the latent after every model call.

All of them drive the same model interface, ``model(x_in, t) -> eps``: the U-Net's noise prediction for the
VP latent ``x_in`` at U-Net timestep ``t`` (classifier-free guidance, if any, lives inside ``model``; a
U-Net that predicts v is put behind this interface by ``eps_from_v``).

* VP samplers (ddpm, ddim, plms, lcm, dpmpp_2m, dpmpp_2m_sde, unipc) keep the latent in VP coordinates,
  x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, and call ``model(x, t)`` directly.
* k-diffusion samplers (lms, euler, euler_ancestral, heun, dpm_2) keep it in VE coordinates,
  x = x0 + sigma eps, and call the model on ``x / sqrt(sigma**2 + 1)`` (diffusers' ``scale_model_input``)
  through ``_denoise``.

The arithmetic follows diffusers' schedulers operation for operation (same float32 scalars, same order), so
the latents agree to float rounding; where diffusers departs from the paper or k-diffusion, a comment says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from sd.samplers.schedule import abar_at, train_sigmas

EpsModel = Callable[[Tensor, Tensor], Tensor]


def eps_from_v(model: Callable[[Tensor, Tensor], Tensor], abar: Tensor) -> EpsModel:
    """The eps interface over a v-predicting model: with x_t = sqrt(a) x0 + sqrt(1 - a) eps and
    v = sqrt(a) eps - sqrt(1 - a) x0, eps = sqrt(a) v + sqrt(1 - a) x_t, a = abar_t (see ``abar_at``)."""
    log_sigmas = train_sigmas(abar.double().cpu()).log()

    def eps(x: Tensor, t: Tensor) -> Tensor:
        a = abar_at(t, log_sigmas).to(device=x.device, dtype=torch.float32)
        return (a.sqrt() * model(x, t) + (1 - a).sqrt() * x).to(x.dtype)

    return eps


def randn(x: Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn like diffusers' ``randn_tensor``.

    A CPU generator draws on the CPU and the result moves to ``x.device``, so a seed gives the same numbers on
    every device (and the same as diffusers given the same generator state).
    """
    if generator is None:
        raise ValueError("this sampler is stochastic: pass an explicit torch.Generator")
    device = x.device if generator.device.type == x.device.type else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, device=device, dtype=dtype or x.dtype).to(x.device)


def _call(model: EpsModel, x_in: Tensor, t: Tensor) -> Tensor:
    return model(x_in, t.to(x_in.device))


def _denoise(model: EpsModel, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
    """k-diffusion's denoiser D(x; sigma) = x - sigma * eps for a VE latent x."""
    eps = _call(model, x / (sigma**2 + 1) ** 0.5, t)
    return x - sigma * eps


def _vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, lambda_t) of the VP process at VE noise level sigma; lambda = log(alpha / sigma)."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


# --- discrete VP samplers -----------------------------------------------------------------------------------


def sample_ddpm(
    model: EpsModel, x: Tensor, timesteps: Tensor, abar: Tensor, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Ancestral sampling of Ho et al. (2020) with the "fixed_small" posterior variance, over a strided grid.

    Each step jumps to the next listed timestep (abar = 1 after the last), so the posterior is the one for the
    strided chain.
    """
    one = torch.tensor(1.0)
    for i, t in enumerate(timesteps):
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else one
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        eps = _call(model, x, t)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        mean = (a_prev**0.5 * beta_t) / (1 - a_t) * x0 + alpha_t**0.5 * (1 - a_prev) / (1 - a_t) * x
        if t > 0:
            # diffusers clamps the variance (0 on the step into abar = 1) and still draws noise there, unlike
            # the paper's z = 0 on the last step (a 1e-10 effect, but it advances the generator)
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
            mean = mean + variance**0.5 * randn(x, generator)
        x = mean
        yield x


def sample_ddim(
    model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    abar: Tensor,
    final_abar: Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 has DDPM's variance.

    The last step lands on ``final_abar`` (SD1.5: abar_0, ``set_alpha_to_one=False``), not on a clean x0.
    """
    for i, t in enumerate(timesteps):
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else final_abar
        eps = _call(model, x, t)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * randn(x, generator)
        yield x


def _pndm_transfer(x: Tensor, abar: Tensor, final_abar: Tensor, t: int, t_prev: int, eps: Tensor) -> Tensor:
    """PNDM's transfer function phi(x_t, eps, t -> t_prev) (Liu et al. 2022); equal to a DDIM step."""
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else final_abar
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def sample_plms(
    model: EpsModel, x: Tensor, timesteps: Tensor, abar: Tensor, final_abar: Tensor, stride: int
) -> Iterator[Tensor]:
    """PLMS: PNDM with the Runge-Kutta warm-up skipped (``skip_prk_steps=True``, as SD1.5 ships).

    ``timesteps`` repeats the second one (e.g. 751, 501, 501, 251, 1): call 0 steps t -> t - stride with
    eps_0, call 1 redoes that step with the mean of eps_0 and the eps at the predicted point (a Heun start),
    later calls are Adams-Bashforth steps of order 2, 3, 4 over the stored eps.

    Like diffusers, the first two calls of a run always play those roles, also when img2img starts a run on
    the first of the repeated timesteps (which then mixes eps from different noise levels); kept for parity.
    """
    history: list[Tensor] = []
    x_start = x
    for i, t in enumerate(timesteps.tolist()):
        eps = _call(model, x, timesteps[i])
        if i == 1:
            eps, x, t_from, t_to = (eps + history[-1]) / 2, x_start, t + stride, t
        else:
            history = [*history[-3:], eps]
            t_from, t_to = t, t - stride
            if i == 0:
                x_start = x
            elif len(history) == 2:
                eps = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                eps = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                eps = 1 / 24 * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        x = _pndm_transfer(x, abar, final_abar, t_from, t_to, eps)
        yield x


def sample_lcm(
    model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    abar: Tensor,
    generator: torch.Generator | None = None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Iterator[Tensor]:
    """Latent Consistency Model multistep sampling (Luo et al. 2023).

    Each step maps x_t to the consistency function's x0 (with the boundary-condition skip/out scalings) and,
    except after the last, re-noises it to the next timestep with fresh noise.
    """
    for i, t in enumerate(timesteps):
        a_t = abar[t]
        scaled_t = t * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
        eps = _call(model, x, t)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        denoised = c_out * x0 + c_skip * x
        if i + 1 < len(timesteps):
            a_next = abar[timesteps[i + 1]]
            x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * randn(denoised, generator)
        else:
            x = denoised
        yield x


# --- k-diffusion (VE) samplers ------------------------------------------------------------------------------


def _lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j}."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.poly1d(np.poly(nodes)) / np.prod([sigmas[i - j] - n for n in nodes])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(
    model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor, order: int = 4, first: int = 0
) -> Iterator[Tensor]:
    """Linear multistep (Adams-Bashforth in sigma) over the last ``order`` derivatives d = (x - D) / sigma.

    ``sigmas``/``timesteps`` are the whole schedule and the run starts at step ``first``. diffusers (and so
    this) raises the order with the global step index, so an img2img run starting at step >= 1 uses
    higher-order coefficients before it has that many derivatives (only the newest are paired); k-diffusion
    counts from the start of the run instead.
    """
    sigmas64 = sigmas.double().numpy()
    derivatives: list[Tensor] = []
    for i in range(first, len(timesteps)):
        sigma = sigmas[i]
        denoised = _denoise(model, x, sigma, timesteps[i])
        derivatives = [*derivatives, (x - denoised) / sigma][-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(sigmas64, i, cur_order, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives), strict=False))
        yield x


def sample_euler(model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor) -> Iterator[Tensor]:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al.)."""
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        denoised = _denoise(model, x, sigma, t)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
        yield x


def sample_euler_ancestral(
    model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Euler to sigma_down, then fresh noise of std sigma_up (sigma_down**2 + sigma_up**2 = sigma_next**2)."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, t)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        # diffusers draws this noise on the last step too (sigma_up = 0; k-diffusion does not)
        x = x + randn(x, generator) * sigma_up
        yield x


def sample_heun(model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor) -> Iterator[Tensor]:
    """Heun's 2nd-order method (Karras et al. Alg. 1, no churn); the step to sigma = 0 is a plain Euler step.

    Yields twice per step (after the Euler predictor and after the correction), once on the last step.
    """
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - _denoise(model, x, sigma, t)) / sigma
        dt = sigma_next - sigma
        x_pred = x + d * dt
        yield x_pred
        if i + 1 == len(timesteps):
            break
        d_next = (x_pred - _denoise(model, x_pred, sigma_next, timesteps[i + 1])) / sigma_next
        x = x + (d + d_next) / 2 * dt
        yield x


def sample_dpm_2(
    model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor, sigmas_mid: Tensor, timesteps_mid: Tensor
) -> Iterator[Tensor]:
    """DPM-Solver-2 in k-diffusion's form: Euler to the log-midpoint sigma, then the full step with its slope.

    ``sigmas_mid[i]``/``timesteps_mid[i]`` are the midpoint of step i; the step to sigma = 0 is plain Euler.
    """
    for i, t in enumerate(timesteps):
        sigma, sigma_mid, sigma_next = sigmas[i], sigmas_mid[i], sigmas[i + 1]
        d = (x - _denoise(model, x, sigma, t)) / sigma
        if i + 1 == len(timesteps):
            yield x + d * (sigma_next - sigma)
            break
        x_mid = x + d * (sigma_mid - sigma)
        yield x_mid
        d_mid = (x_mid - _denoise(model, x_mid, sigma_mid, timesteps_mid[i])) / sigma_mid
        x = x + d_mid * (sigma_next - sigma)
        yield x


# --- exponential-integrator multistep samplers (VP latents, sigma grid) -------------------------------------


def _vp_x0(model: EpsModel, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
    """Data prediction x0 = (x_t - sigma_t eps) / alpha_t for a VP latent at VE noise level sigma."""
    alpha_t, sigma_t, _ = _vp_coefficients(sigma)
    return (x - sigma_t * _call(model, x, t)) / alpha_t


def _dpmpp_2m(
    model: EpsModel,
    x: Tensor,
    sigmas: Tensor,
    timesteps: Tensor,
    generator: torch.Generator | None,
    sde: bool,
) -> Iterator[Tensor]:
    previous: Tensor | None = None  # last step's x0 prediction
    for i, t in enumerate(timesteps):
        x0 = _vp_x0(model, x, sigmas[i], t)
        _, sigma_s, lambda_s = _vp_coefficients(sigmas[i])
        alpha_t, sigma_t, lambda_t = _vp_coefficients(sigmas[i + 1])
        h = lambda_t - lambda_s
        # first order on the first step of a run (no history yet) and on the step to sigma = 0 (diffusers'
        # lower_order_final with final_sigmas_type="zero"; k-diffusion does the same)
        second_order = previous is not None and i + 1 < len(timesteps)
        if second_order:
            h_last = lambda_s - _vp_coefficients(sigmas[i - 1])[2]
            d1 = 1.0 / (h_last / h) * (x0 - previous)
        if sde:
            noise = randn(x, generator, dtype=torch.float32)
            x = sigma_t / sigma_s * torch.exp(-h) * x + alpha_t * (1 - torch.exp(-2.0 * h)) * x0
            if second_order:
                x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
            x = x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        else:
            x = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * x0
            if second_order:
                x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        previous = x0
        yield x


def sample_dpmpp_2m(model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor) -> Iterator[Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), midpoint form, in lambda = log(alpha_t / sigma_t)."""
    return _dpmpp_2m(model, x, sigmas, timesteps, None, sde=False)


def sample_dpmpp_2m_sde(
    model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """SDE-DPM-Solver++(2M), midpoint form: diffusers' ``sde-dpmsolver++``, k-diffusion's dpmpp_2m_sde.

    Noise is i.i.d. Gaussian from ``generator`` as in diffusers; k-diffusion/A1111 draw it from a Brownian
    tree, so their seeds do not carry over.
    """
    return _dpmpp_2m(model, x, sigmas, timesteps, generator, sde=True)


def _unipc_update(
    x: Tensor,
    sigmas: Tensor,
    s: int,
    t_index: int,
    m0: Tensor,
    older: Tensor | None,
    m_t: Tensor | None,
) -> Tensor:
    """One UniPC-bh2 update of order 1 or 2 from sigma_s to sigma_t in data-prediction form.

    Predictor (``m_t`` None): UniP with the previous output ``older`` (at s - 1) as the 2nd-order term.
    Corrector (``m_t`` given): UniC, which also uses the model output at the target point.
    """
    alpha_t, sigma_t, lambda_t = _vp_coefficients(sigmas[t_index])
    _, sigma_s, lambda_s = _vp_coefficients(sigmas[s])
    h = lambda_t - lambda_s
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # "bh2" variant: B(h) = e^h - 1
    x_t = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
    rks, d1s = [], []
    if older is not None:
        rk = (_vp_coefficients(sigmas[s - 1])[2] - lambda_s) / h
        rks.append(rk)
        d1s.append((older - m0) / rk)
    if m_t is None:  # UniP; at order 2 diffusers (and the UniPC reference code) fix rho = 1/2
        return x_t - alpha_t * b_h * (0.5 * d1s[0]) if d1s else x_t
    rks.append(torch.ones(()))
    rks_t = torch.stack(rks)
    order = len(rks)
    # UniC weights: solve the order conditions sum_k rho_k r_k^(j-1) = phi-terms of h, j = 1..order
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        rows.append(torch.pow(rks_t, j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if order == 1:
        rhos = torch.ones(1, dtype=x.dtype) * 0.5
    else:
        rhos = torch.linalg.solve(torch.stack(rows), torch.stack(b)).to(x.dtype)
    corr = rhos[0] * d1s[0] if d1s else 0
    return x_t - alpha_t * b_h * (corr + rhos[-1] * (m_t - m0))


def sample_unipc(model: EpsModel, x: Tensor, sigmas: Tensor, timesteps: Tensor) -> Iterator[Tensor]:
    """UniPC (Zhao et al. 2023): 2nd-order UniP predictor + UniC corrector, bh2, data prediction.

    The corrector of step i -> i+1 needs the model output at i+1, so it runs at the start of step i+1 and
    replaces the latent the model was just called on: what is yielded after each call is the predictor's
    result, and the final step is never corrected. The order drops to 1 on the first and last step.
    """
    n = len(timesteps)
    outputs: list[Tensor] = []  # x0 predictions, newest last
    last_x: Tensor | None = None
    last_order = 1
    for i, t in enumerate(timesteps):
        m = _vp_x0(model, x, sigmas[i], t)
        if last_x is not None:
            older = outputs[-2] if last_order == 2 else None
            x = _unipc_update(last_x, sigmas, i - 1, i, outputs[-1], older, m)
        outputs = [*outputs[-1:], m]
        order = min(2, n - i, len(outputs))
        last_x, last_order = x, order
        x = _unipc_update(x, sigmas, i, i + 1, m, outputs[-2] if order == 2 else None, None)
        yield x
