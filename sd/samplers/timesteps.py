"""A1111's "timesteps" samplers (v1.10.1, sd_samplers_timesteps*.py): DDIM, DDIM CFG++, PLMS and UniPC.

Unlike the k-diffusion set they work on the VP latent x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and call
an eps model directly:

    model(x, t) -> eps      the (CFG-combined) noise prediction at U-Net timestep t, a 0-d float tensor:
                            integral for DDIM and PLMS, fractional for UniPC (999, 949.05, ...)
    noise() -> Tensor       the next draw of every image's own stream (DDIM's eta noise)

Each function yields x after every model call (UniPC: after each of its updates, which number the same as
its calls); the last yield is the result. The scalars are A1111's: abar from the model's float32 table,
abar_prev in float64 and DDIM's sigmas from float64 numpy arithmetic, every per-step value taken with
`.item()` and so rounded to x's dtype; UniPC is A1111's copy of uni_pc.py in float32 on x's device. The
results agree with A1111's code to float rounding (bit for bit on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sd.noise import ImageNoise

EpsModel = Callable[[Tensor, Tensor], Tensor]
CfgppModel = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # -> (CFG-combined eps, uncond eps)
Noise = Callable[[], Tensor]

CFGPP_SCALE = 1 / 12.5  # DDIM CFG++ multiplies the CFG scale by this (A1111's cond_scale_miltiplier)
TRAIN_TIMESTEPS = 1000  # A1111 hard-codes it, whatever the model's schedule length


def ddim_timesteps(steps: int) -> Tensor:
    """A1111's timestep list, ascending: 1, 1 + 1000 // steps, ... (int64). It has more than `steps`
    entries when 1000 % steps is large (30 steps: 31 entries, 1 to 991)."""
    if not 1 <= steps <= TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be 1 to {TRAIN_TIMESTEPS}, got {steps}")
    return (torch.arange(0, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS // steps) + 1).clip(0, TRAIN_TIMESTEPS - 1)


def setup_img2img_steps(
    steps: int, strength: float, explicit_steps: int | None = None, fix_steps: bool = False
) -> tuple[int, int]:
    """(steps, t_enc) as A1111's setup_img2img_steps: by default the run's own steps and
    t_enc = int(min(strength, 0.999) * steps); with explicit steps (the hires pass) or "img2img_fix_steps",
    a longer schedule of int(requested / min(strength, 0.999)) steps and t_enc = requested - 1."""
    if fix_steps or explicit_steps is not None:
        requested = explicit_steps or steps
        return (int(requested / min(strength, 0.999)) if strength > 0 else 0), requested - 1
    return steps, int(min(strength, 0.999) * steps)


def _scalar(value: Tensor, like: Tensor) -> Tensor:
    """A1111's `value.item() * x.new_ones(...)`: the value rounded to x's dtype, on x's device."""
    return torch.full((), float(value), dtype=like.dtype, device=like.device)


def _prev_dtype(x: Tensor) -> torch.dtype:
    # A1111 (torch_utils.float64) keeps abar_prev in float64 except where the device has none
    return torch.float32 if x.device.type in ("mps", "xpu") else torch.float64


def _ddim_tables(
    alphas_cumprod: Tensor, timesteps: Tensor, x: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(abar, abar_prev, sqrt(1 - abar), DDIM sigma) at every entry; entry 0's abar_prev is abar[0]."""
    table, timesteps = alphas_cumprod.cpu(), timesteps.cpu()
    a = table[timesteps]
    a_prev = table[torch.nn.functional.pad(timesteps[:-1], (1, 0))].to(_prev_dtype(x))
    # A1111 mixes numpy and torch here: `ndarray / tensor` is `tensor.reciprocal() * ndarray`, a reciprocal
    # in abar's dtype; the rest is float64.
    sigmas = eta * ((1 - a_prev) * (1 - a).reciprocal() * (1 - a.to(a_prev.dtype) / a_prev)).sqrt()
    return a, a_prev, (1 - a).sqrt(), sigmas


def _ddim(
    model: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, timesteps: Tensor,
    alphas_cumprod: Tensor, noise: Noise, eta: float,
) -> Iterator[Tensor]:  # fmt: skip
    """DDIM steps down the list, from its last entry to entry 1 (entry 0 is never evaluated); `model`
    gives (eps for the x0 prediction, eps for the direction to x_prev)."""
    tables = _ddim_tables(alphas_cumprod, timesteps, x, eta)
    for index in range(len(timesteps) - 1, 0, -1):
        e_t, e_dir = model(x, _scalar(timesteps[index], x))
        a_t, a_prev, sqrt_one_minus_at, sigma_t = (_scalar(table[index], x) for table in tables)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_dir
        # drawn at eta 0 too (sigma 0): A1111 consumes the images' streams at every step
        x = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise()
        yield x


def ddim(
    model: EpsModel, x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, noise: Noise, eta: float = 0.0
) -> Iterator[Tensor]:
    """DDIM (Song et al. 2020) on A1111's timesteps; `eta` is A1111's eta_ddim (infotext "Eta DDIM")."""

    def both(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        e_t = model(x, t)
        return e_t, e_t

    yield from _ddim(both, x, timesteps, alphas_cumprod, noise, eta)


def ddim_cfgpp(
    model: CfgppModel, x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, noise: Noise, eta: float = 0.0
) -> Iterator[Tensor]:
    """DDIM with CFG++ (Chung et al. 2024): x0 from the guided eps, the direction from the unconditional
    one. `model` returns (guided eps, uncond eps), guided at CFG scale * CFGPP_SCALE."""
    yield from _ddim(model, x, timesteps, alphas_cumprod, noise, eta)


def plms(model: EpsModel, x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Iterator[Tensor]:
    """PLMS (Liu et al. 2022): a pseudo improved Euler first step (two calls), then Adams-Bashforth of
    orders 2, 3 and 4 on eps, each step a DDIM (eta 0) transfer."""
    a, a_prev, sqrt_one_minus_a, _ = _ddim_tables(alphas_cumprod, timesteps, x, 0.0)

    def transfer(x: Tensor, e: Tensor, index: int) -> Tensor:
        a_t, a_p, s = _scalar(a[index], x), _scalar(a_prev[index], x), _scalar(sqrt_one_minus_a[index], x)
        return a_p.sqrt() * ((x - s * e) / a_t.sqrt()) + (1.0 - a_p).sqrt() * e

    old: list[Tensor] = []
    for index in range(len(timesteps) - 1, 0, -1):
        e_t = model(x, _scalar(timesteps[index], x))
        if not old:
            x_next = transfer(x, e_t, index)
            yield x_next
            e_prime = (e_t + model(x_next, _scalar(timesteps[index - 1], x))) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = transfer(x, e_prime, index)
        old = [*old, e_t][-3:]  # the first step keeps its first eps, not the averaged one
        yield x


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise linear through (xp, yp), xp ascending, extended linearly past both ends. The segment of a
    point on a knot is the one below it, as A1111's sort-based interpolate_fn picks it."""
    points = x.reshape(-1)
    knots = xp.to(torch.promote_types(x.dtype, xp.dtype))  # A1111 sorts x among the knots in this dtype
    lo = (torch.searchsorted(knots, points.to(knots.dtype), side="left") - 1).clamp(0, len(xp) - 2)
    x0, x1, y0, y1 = knots[lo], knots[lo + 1], yp[lo], yp[lo + 1]
    return (y0 + (points - x0) * (y1 - y0) / (x1 - x0)).reshape(x.shape)


class _DiscreteVP:
    """UniPC's view of the model (NoiseScheduleVP "discrete"): log alpha_t = log(abar) / 2, piecewise
    linear in continuous time t, with table entry n at t = (n + 1) / N."""

    def __init__(self, alphas_cumprod: Tensor, device: torch.device):
        self.log_alphas = 0.5 * alphas_cumprod.to(device).log()
        self.n = len(self.log_alphas)
        self.times = torch.linspace(0.0, 1.0, self.n + 1)[1:].to(device)

    def log_alpha(self, t: Tensor) -> Tensor:
        return _interp(t, self.times, self.log_alphas)

    def std(self, t: Tensor) -> Tensor:
        return (1.0 - (2.0 * self.log_alpha(t)).exp()).sqrt()

    def lam(self, t: Tensor) -> Tensor:
        """Half the log-SNR."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * (1.0 - (2.0 * log_alpha).exp()).log()

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        log_alpha = -0.5 * torch.logaddexp(lam.new_zeros((1,)), -2.0 * lam)
        return _interp(log_alpha, self.log_alphas.flip(0), self.times.flip(0))


def _unipc_times(
    ns: _DiscreteVP, skip_type: str, t_top: float | Tensor, t_0: float, n: int, device: torch.device
) -> Tensor:  # fmt: skip
    """n + 1 continuous times from t_top down to t_0."""
    if skip_type == "logSNR":
        lam_top = ns.lam(torch.as_tensor(t_top, dtype=torch.float32, device=device))
        lam_0 = ns.lam(torch.as_tensor(t_0, dtype=torch.float32, device=device))
        return ns.t_of_lambda(torch.linspace(float(lam_top), float(lam_0), n + 1).to(device))
    if skip_type == "time_uniform":
        return torch.linspace(float(t_top), t_0, n + 1).to(device)
    if skip_type == "time_quadratic":
        return torch.linspace(float(t_top**0.5), t_0**0.5, n + 1).pow(2).to(device)
    raise ValueError(f"unknown UniPC skip type {skip_type!r}; one of: {', '.join(UNIPC_SKIP_TYPES)}")


def _unipc_step_terms(
    ns: _DiscreteVP, models: list[Tensor], times: list[Tensor], t: Tensor, order: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """What both UniPC forms start from: the last model output m0, sigma_t / sigma_s, alpha_t, the step h in
    lambda, the ratios r_k of the earlier steps (then 1) and the scaled differences D1_k."""
    lambda_0, m0 = ns.lam(times[-1]), models[-1]
    sigma_ratio, alpha_t = ns.std(t) / ns.std(times[-1]), ns.log_alpha(t).exp()
    h = ns.lam(t) - lambda_0
    rks, d1s = [], []
    for i in range(1, order):
        rk = (ns.lam(times[-(i + 1)]) - lambda_0) / h
        rks.append(rk)
        d1s.append((models[-(i + 1)] - m0) / rk)
    return m0, sigma_ratio, alpha_t, h, torch.stack([*rks, h.new_ones(())]), d1s


def _unipc_bh(
    data: EpsModel, ns: _DiscreteVP, x: Tensor, models: list[Tensor], times: list[Tensor], t: Tensor,
    order: int, use_corrector: bool, variant: str,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """UniPC-p predictor (order `order`) and UniC corrector with B(h) = h (bh1) or e^h - 1 (bh2), in the
    data-prediction form; returns (x at t, the model's x0 at the predicted point, or None)."""
    m0, sigma_ratio, alpha_t, h, rks, d1s = _unipc_step_terms(ns, models, times, t, order)

    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = torch.stack(rows), torch.stack(b)

    x_base = sigma_ratio * x - (alpha_t * h_phi_1) * m0
    d1 = torch.stack(d1s, dim=1) if d1s else None
    x_t = x_base
    if d1 is not None:
        rhos_p = b.new_tensor([0.5]) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
        x_t = x_base - (alpha_t * b_h) * torch.einsum("k,bkchw->bchw", rhos_p, d1)
    if not use_corrector:
        return x_t, None
    rhos_c = b.new_tensor([0.5]) if order == 1 else torch.linalg.solve(big_r, b)
    model_t = data(x_t, t)
    corr = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1) if d1 is not None else 0
    return x_base - (alpha_t * b_h) * (corr + rhos_c[-1] * (model_t - m0)), model_t


def _unipc_vary(
    data: EpsModel, ns: _DiscreteVP, x: Tensor, models: list[Tensor], times: list[Tensor], t: Tensor,
    order: int, use_corrector: bool, variant: str,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The "vary_coeff" UniPC: coefficients from the inverse of the Taylor matrix C of the rks."""
    m0, sigma_ratio, alpha_t, h, rks, d1s = _unipc_step_terms(ns, models, times, t, order)
    k_len = len(rks)
    columns, column = [], torch.ones_like(rks)
    for k in range(1, k_len + 1):
        columns.append(column)
        column = column * rks / (k + 1)
    c = torch.stack(columns, dim=1)

    hh = -h
    h_phi_ks, h_phi_k, factorial = [], torch.expm1(hh), 1
    for k in range(1, k_len + 2):
        h_phi_ks.append(h_phi_k)
        h_phi_k = h_phi_k / hh - 1 / factorial
        factorial *= k + 1

    x_base = sigma_ratio * x - alpha_t * h_phi_ks[0] * m0
    x_t, d1 = x_base, None
    if d1s:
        d1 = torch.stack(d1s, dim=1)
        a_p = torch.linalg.inv(c[:-1, :-1])
        for k in range(k_len - 1):
            x_t = x_t - alpha_t * h_phi_ks[k + 1] * torch.einsum("bkchw,k->bchw", d1, a_p[k])
    if not use_corrector:
        return x_t, None
    a_c = torch.linalg.inv(c)
    model_t = data(x_t, t)
    x_t = x_base
    last = 0  # the corrector's own term takes its coefficient from the last row used (0 when none is)
    for last in range(k_len - 1):
        x_t = x_t - alpha_t * h_phi_ks[last + 1] * torch.einsum("bkchw,k->bchw", d1, a_c[last][:-1])
    return x_t - alpha_t * h_phi_ks[k_len] * ((model_t - m0) * a_c[last][-1]), model_t


UNIPC_VARIANTS = {"bh1": _unipc_bh, "bh2": _unipc_bh, "vary_coeff": _unipc_vary}
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")


def unipc(
    model: EpsModel, x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
    variant: str = "bh1", skip_type: str = "time_uniform", order: int = 3, lower_order_final: bool = True,
    img2img: bool = False,
) -> Iterator[Tensor]:  # fmt: skip
    """UniPC (Zhao et al. 2023), multistep, data prediction, as A1111 runs it: len(timesteps) steps over
    continuous time from 1 (img2img: timesteps[-1] / 1000 + 1 / 1000) down to 1 / 1000, the model called at
    timestep (t - 1 / 1000) * 1000. Yields after each update: the first `order - 1` warm up at lower
    orders, the last makes no corrector call."""
    steps = len(timesteps)
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; one of: {', '.join(UNIPC_VARIANTS)}")
    if steps < order:
        raise ValueError(f"UniPC order must be < sampling steps (order {order}, {steps} steps)")
    update = UNIPC_VARIANTS[variant]
    ns = _DiscreteVP(alphas_cumprod, x.device)
    t_0 = 1.0 / ns.n
    t_top = timesteps[-1].to(x.device) / TRAIN_TIMESTEPS + 1 / TRAIN_TIMESTEPS if img2img else 1.0
    times_all = _unipc_times(ns, skip_type, t_top, t_0, steps, x.device)

    def data(x: Tensor, t: Tensor) -> Tensor:
        eps = model(x, (t - 1.0 / ns.n) * 1000.0)
        return (x - ns.std(t) * eps) / ns.log_alpha(t).exp()

    models, times = [data(x, times_all[0])], [times_all[0]]
    for step in range(1, steps + 1):
        t = times_all[step]
        step_order = min(step, order)  # the warm-up steps use every value so far
        if step >= order and lower_order_final:
            step_order = min(order, steps + 1 - step)
        x, model_x = update(data, ns, x, models, times, t, step_order, step < steps, variant)
        yield x
        if step < order:
            models, times = [*models, model_x], [*times, t]
        else:
            models, times = [*models[1:], model_x], [*times[1:], t]


@dataclass(frozen=True)
class TimestepsSpec:
    function: Callable[..., Iterator[Tensor]]
    takes_eta: bool = False  # eta_ddim, infotext "Eta DDIM" when not 0
    cfgpp: bool = False  # model returns (guided eps, uncond eps); the CFG scale is multiplied by CFGPP_SCALE
    unipc: bool = False  # takes the uni_pc_* options


# Label -> spec, and A1111's aliases (sd_samplers_timesteps.samplers_timesteps), for a1111.py to merge.
TIMESTEPS_SAMPLERS: dict[str, TimestepsSpec] = {
    "DDIM": TimestepsSpec(ddim, takes_eta=True),
    "DDIM CFG++": TimestepsSpec(ddim_cfgpp, takes_eta=True, cfgpp=True),
    "PLMS": TimestepsSpec(plms),
    "UniPC": TimestepsSpec(unipc, unipc=True),
}
TIMESTEPS_ALIASES: dict[str, str] = {
    "ddim": "DDIM",
    "ddim_cfgpp": "DDIM CFG++",
    "plms": "PLMS",
    "unipc": "UniPC",
}


def timesteps_label(name: str) -> str:
    """The A1111 label of a timesteps sampler given by label or alias, any case; ValueError else."""
    wanted = name.strip().lower()
    for label in TIMESTEPS_SAMPLERS:
        if wanted == label.lower():
            return label
    if wanted in TIMESTEPS_ALIASES:
        return TIMESTEPS_ALIASES[wanted]
    raise ValueError(f"unknown A1111 timesteps sampler {name!r}; one of: {', '.join(TIMESTEPS_SAMPLERS)}")


@dataclass(eq=False)
class TimestepsSampler:
    """A1111 timesteps sampler `label` bound to `steps` over the model's abar table (float32, 1000 values).

    `start` counts the top entries of the timestep list a run skips: 0 for txt2img; img2img runs
    timesteps[:t_enc], so start = len(timesteps) - t_enc."""

    label: str
    steps: int
    alphas_cumprod: Tensor
    eta: float | None = None  # None: A1111's eta_ddim default, 0
    discard_penultimate: bool = False  # A1111's always_discard_next_to_last_sigma: the list of steps + 1
    unipc_variant: str = "bh1"  # A1111's uni_pc_* options, at their defaults
    unipc_skip_type: str = "time_uniform"
    unipc_order: int = 3
    unipc_lower_order_final: bool = True

    def __post_init__(self) -> None:
        self.label = timesteps_label(self.label)
        self.spec = TIMESTEPS_SAMPLERS[self.label]
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        self.timesteps = ddim_timesteps(self.steps + (1 if self.discard_penultimate else 0))
        if self.spec.unipc and (
            self.unipc_variant not in UNIPC_VARIANTS
            or self.unipc_skip_type not in UNIPC_SKIP_TYPES
            or self.unipc_order < 1
        ):
            raise ValueError(
                f"bad UniPC settings: variant {self.unipc_variant!r} (one of {', '.join(UNIPC_VARIANTS)}), "
                f"skip type {self.unipc_skip_type!r} (one of {', '.join(UNIPC_SKIP_TYPES)}), order "
                f"{self.unipc_order} (at least 1)"
            )

    @property
    def total_steps(self) -> int:
        """Prompt-editing steps: `steps` for all four (none is second-order in A1111's table), although
        DDIM makes one call fewer and PLMS one more per step of its first."""
        return self.steps

    @property
    def infotext(self) -> dict[str, object]:
        """What A1111 adds to the infotext for the sampler settings."""
        out: dict[str, object] = {}
        if self.spec.takes_eta and self.eta:
            out["Eta DDIM"] = self.eta
        if self.discard_penultimate:
            out["Discard penultimate sigma"] = True
        return out

    def denoiser_steps(self, start: int = 0, img2img: bool = False) -> int:
        """The calls A1111's CFG denoiser expects (its total_steps), and the steps A1111 counts
        (launch_sampling): the steps of txt2img, t_enc + 1 of an img2img run from `start`."""
        return len(self.timesteps) - start + 1 if img2img else self.steps

    sampling_steps = denoiser_steps

    def step_of_call(self, call: int) -> int | None:
        """The step model call `call` belongs to (PLMS calls twice at its first); None for UniPC, whose
        progress A1111 reports its own way."""
        if self.spec.unipc:
            return None
        return max(call - 1, 0) if self.spec.function is plms else call

    def img2img_start(self, strength: float) -> int:
        """`start` of A1111's default img2img (t_enc = int(min(strength, 0.999) * steps))."""
        _, t_enc = setup_img2img_steps(self.steps, strength)
        return len(self.timesteps) - t_enc

    def calls(self, start: int = 0) -> int:
        """Model calls of a run from `start`: DDIM one per list entry but the first, PLMS one more (its
        first step calls twice), UniPC one per entry. ValueError where A1111's UniPC fails."""
        n = len(self.timesteps) - start
        if self.spec.unipc:
            if n < self.unipc_order:
                raise ValueError(f"UniPC order must be < sampling steps ({self.unipc_order}, {n} steps)")
            return n
        if self.spec.function is plms:
            return n if n >= 2 else 0
        return max(n - 1, 0)

    def txt2img_latent(self, noise: Tensor) -> Tensor:
        """The txt2img start: the initial noise as it is (no sigma scaling)."""
        return noise

    def img2img_latent(self, x0: Tensor, noise: Tensor, start: int) -> Tensor:
        """A1111's sample_img2img start: x0 noised to abar at timesteps[t_enc], one entry above the first
        one evaluated (A1111's choice)."""
        t = self.timesteps[len(self.timesteps) - start]
        a = self.alphas_cumprod[t]
        return x0 * torch.sqrt(a).to(x0.device) + noise * torch.sqrt(1 - a).to(x0.device)

    def sample(
        self, model: Callable, x: Tensor, noise: ImageNoise | None = None, start: int = 0
    ) -> Iterator[Tensor]:
        """Run from `start`, yielding x after every model call. `model` is the eps model (DDIM CFG++:
        (guided eps, uncond eps)); `noise` the images' streams, drawn by DDIM at every step."""
        timesteps = self.timesteps[: len(self.timesteps) - start]
        if self.spec.unipc:
            yield from unipc(
                model, x, timesteps, self.alphas_cumprod, self.unipc_variant, self.unipc_skip_type,
                self.unipc_order, self.unipc_lower_order_final, img2img=start > 0,
            )  # fmt: skip
        elif self.spec.takes_eta:
            if noise is None:
                raise ValueError(f"{self.label} draws noise at every step: pass the images' streams")
            draw = noise.next
            yield from self.spec.function(
                model, x, timesteps, self.alphas_cumprod, lambda: draw().to(x), eta=self.eta or 0.0
            )
        else:
            yield from plms(model, x, timesteps, self.alphas_cumprod)


__all__ = [
    "CFGPP_SCALE",
    "TIMESTEPS_ALIASES",
    "TIMESTEPS_SAMPLERS",
    "UNIPC_SKIP_TYPES",
    "UNIPC_VARIANTS",
    "TimestepsSampler",
    "TimestepsSpec",
    "ddim",
    "ddim_cfgpp",
    "ddim_timesteps",
    "plms",
    "setup_img2img_steps",
    "timesteps_label",
    "unipc",
]
