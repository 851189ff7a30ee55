"""The simulated target domain ``x_t, y_t = T(x_s, y_s)`` (paper Sec. 2.1), on batched tensors on any device.

Components, applied in this order, each to a random subset of the batch (probability ``p`` per sample) and each
switchable (``enabled``) and parameterised:

- ``geometric``: rotation about the patch centre and scaling, image and label together (labels nearest);
- ``gin``: random-convolution augmentation (GIN): a fresh random network of ``layers`` 3D convolutions (kernel 1 or
  3, ``channels`` wide, leaky ReLU) per sample, mixed with the input by a random weight and rescaled to the input's
  Frobenius norm;
- ``bias``: a smooth multiplicative field, exp of a random Legendre polynomial of degree ``order``;
- ``intensity``: gamma on the min-max normalised image, then contrast (scale about the mean) and a shift (in units
  of the sample's standard deviation);
- ``histogram``: a random monotone piecewise-linear intensity map through ``control_points`` points;
- ``smooth``: Gaussian blur with a random ``sigma`` (voxels);
- ``noise``: additive Gaussian noise, ``std`` relative to the sample's standard deviation.

Only the geometric part touches the label. Everything is torch (``affine_grid``/``grid_sample``, ``conv3d``), so
it runs where the batch lives; on an accelerator it never synchronises with the host (every sample is computed and
a device-side mask selects), on the CPU the unselected samples are skipped. Random numbers come from the module's own
generators (seeded by ``seed``; their state is part of ``state_dict()``): the same seed on the same device gives
the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import nn

from gsema_fast.config import TargetTransformConfig


# Each component's default settings: those of the config's target_transform section (its one home, which also checks
# every setting), ranges and kernel lists as tuples, the form the settings take once resolved.
def _resolved(tt: TargetTransformConfig) -> dict[str, dict]:
    return {
        name: {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}
        for name, section in tt.model_dump().items()
    }


DEFAULTS: dict[str, dict] = _resolved(TargetTransformConfig())
ORDER = tuple(DEFAULTS)
_EPS = 1e-6


def _per_sample(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(-1, *([1] * (ndim - 1)))


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """[B, 3] angles (radians) about the three axes -> [B, 3, 3] rotation matrices."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def _legendre(n: int, order: int, device) -> torch.Tensor:
    """[order + 1, n]: Legendre polynomials P_0..P_order on n points of [-1, 1]."""
    x = torch.linspace(-1.0, 1.0, n, device=device)
    ps = [torch.ones_like(x), x]
    for k in range(1, order):
        ps.append(((2 * k + 1) * x * ps[k] - k * ps[k - 1]) / (k + 1))
    return torch.stack(ps[: order + 1])


class TargetTransform(nn.Module):
    """``x_t, y_t = T(x, y)``: the simulated target domain of a batch (see the module docstring).

    ``x``: [B, C, D, H, W] float images; ``y``: [B, 1, D, H, W] or [B, D, H, W] integer labels. Returns a float32
    image and a label of ``y``'s dtype and shape, on the input's device. Keyword arguments are the components'
    settings (mappings that override :data:`DEFAULTS`, or ``False`` to switch one off), e.g.
    ``TargetTransform(gin={"p": 1.0}, noise=False, seed=3)``; :meth:`from_config` builds the one a config describes.
    """

    def __init__(self, *, seed: int = 0, **components: Mapping | bool | None):
        super().__init__()
        # ``gin=False`` switches a component off; the config's section checks every name and value.
        sections = {
            name: {"enabled": given} if isinstance(given, bool) else given for name, given in components.items()
        }
        self.cfg = _resolved(TargetTransformConfig(**sections))
        self.seed = int(seed)
        self._host = torch.Generator().manual_seed(self.seed)  # shapes and kernel sizes: host-side integers
        self._gens: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, tt: TargetTransformConfig, *, seed: int) -> TargetTransform:
        """The transform that a config's ``target_transform`` section describes, its random streams seeded by
        ``seed``. ``tt``: a :class:`gsema_fast.config.TargetTransformConfig` (``cfg.target_transform``)."""
        if not isinstance(tt, TargetTransformConfig):
            raise TypeError(f"tt must be a TargetTransformConfig, got {type(tt).__name__}")
        return cls(seed=seed, **tt.model_dump())

    def extra_repr(self) -> str:
        on = [n for n in ORDER if self.cfg[n]["enabled"] and self.cfg[n]["p"] > 0]
        return f"seed={self.seed}, components={on}"

    # reproducible across checkpoints: the generators' states travel in state_dict()
    def get_extra_state(self):
        states = {k: g.get_state() for k, g in self._gens.items()}
        states.update({k: v for k, v in self._pending.items() if k not in states})
        return {"seed": self.seed, "host": self._host.get_state(), "devices": states}

    def set_extra_state(self, state) -> None:
        self.seed = int(state["seed"])
        self._host.set_state(state["host"])
        self._gens.clear()
        self._pending = dict(state["devices"])

    def reseed(self, seed: int) -> None:
        """Restart every random stream from ``seed``."""
        self.seed = int(seed)
        self._host.manual_seed(self.seed)
        self._gens.clear()
        self._pending.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            else:
                gen.manual_seed(self.seed + 1)
            self._gens[key] = gen
        return gen

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5:
            raise ValueError(f"TargetTransform: x must be [B, C, D, H, W], got shape {tuple(x.shape)}")
        label_4d = y.dim() == 4
        y5 = y.unsqueeze(1) if label_4d else y
        if y5.dim() != 5 or y5.shape[0] != x.shape[0] or y5.shape[2:] != x.shape[2:]:
            raise ValueError(f"TargetTransform: label shape {tuple(y.shape)} does not match image {tuple(x.shape)}")
        gen = self._generator(x.device)
        x = x.float()
        for name in ORDER:
            cfg = self.cfg[name]
            if not cfg["enabled"] or cfg["p"] <= 0:
                continue
            apply = torch.rand(x.shape[0], generator=gen, device=x.device) < cfg["p"]
            if x.device.type == "cpu":
                # reading the mask costs nothing here, and the unselected samples' work is skipped (GIN's small
                # convolutions dominate a CPU step's data cost)
                idx = apply.nonzero().flatten()
                if idx.numel() == 0:
                    continue
                every = idx.numel() == x.shape[0]
                sub = x if every else x[idx]
                if name == "geometric":
                    sub, sub_y = self._geometric(sub, y5 if every else y5[idx], cfg, gen)
                    y5 = sub_y if every else y5.index_copy(0, idx, sub_y)
                else:
                    sub = getattr(self, f"_{name}")(sub, cfg, gen)
                x = sub if every else x.index_copy(0, idx, sub)
                continue
            # on an accelerator every sample is computed and the mask selects on the device: no host round trip
            if name == "geometric":
                x_new, y5_new = self._geometric(x, y5, cfg, gen)
                y5 = torch.where(_per_sample(apply, 5), y5_new, y5)
            else:
                x_new = getattr(self, f"_{name}")(x, cfg, gen)
            x = torch.where(_per_sample(apply, 5), x_new, x)
        return x, (y5.squeeze(1) if label_4d else y5)

    # ------------------------------------------------------------------------------------------- components

    def _geometric(self, x, y, cfg, gen):
        B, dev = x.shape[0], x.device
        rot = math.radians(float(cfg["rotate_deg"]))
        angles = (torch.rand(B, 3, generator=gen, device=dev) * 2 - 1) * rot
        lo, hi = cfg["scale"]
        s = lo + (hi - lo) * torch.rand(B, 1 if cfg["isotropic"] else 3, generator=gen, device=dev)
        # affine_grid works in [-1, 1] per axis; rotate in voxel units so that non-cubic patches are not sheared
        ext = torch.tensor(x.shape[:1:-1], dtype=torch.float32, device=dev)  # (W, H, D): grid order x, y, z
        ext = ext / ext.max()
        A = _rotation(angles) / s.unsqueeze(-1).expand(B, 3, 1).transpose(1, 2)  # columns divided: zoom by s
        A = A * ext.view(1, 1, 3) / ext.view(1, 3, 1)  # A_ij = R_ij * ext_j / ext_i
        theta = torch.cat([A, torch.zeros(B, 3, 1, device=dev)], dim=2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # outside the patch: the image's background (its median), never zeros (which z-scoring makes mid-grey)
        bg = _per_sample(x.flatten(1)[:, ::7].median(dim=1).values, 5)
        x_t = F.grid_sample(x - bg, grid, mode=cfg["image_mode"], padding_mode="zeros", align_corners=False) + bg
        y_t = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return x_t, y_t.round().to(y.dtype)

    def _gin(self, x, cfg, gen):
        B, C, dev = x.shape[0], x.shape[1], x.device
        kernels = [int(k) for k in cfg["kernels"]]
        widths = [C] + [int(cfg["channels"])] * (int(cfg["layers"]) - 1) + [C]
        h = x
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            k = kernels[int(torch.randint(len(kernels), (1,), generator=self._host))]
            w = torch.randn(B, cout, cin, k, k, k, generator=gen, device=dev)
            b = torch.randn(B, cout, generator=gen, device=dev)
            # one random network per sample: a loop of ordinary convolutions (a grouped one is 7x slower on CPUs),
            # 1x1x1 ones as channel mixing (CPU conv3d takes a slow path for them)
            if k == 1:
                h = torch.einsum("boc,bc...->bo...", w.flatten(2), h) + b.view(B, cout, 1, 1, 1)
            else:
                h = torch.cat([F.conv3d(h[j : j + 1], w[j], b[j], padding=k // 2) for j in range(B)])
            if i < len(widths) - 2:
                h = F.leaky_relu(h, float(cfg["negative_slope"]))
        alpha = _per_sample(torch.rand(B, generator=gen, device=dev), 5)
        mixed = alpha * h + (1 - alpha) * x
        norm_in = x.flatten(1).norm(dim=1)
        norm_out = mixed.flatten(1).norm(dim=1)
        return mixed * _per_sample(norm_in / (norm_out + _EPS), 5)

    def _bias(self, x, cfg, gen):
        B, dev, order = x.shape[0], x.device, int(cfg["order"])
        D, H, W = x.shape[2:]
        c = (torch.rand(B, order + 1, order + 1, order + 1, generator=gen, device=dev) * 2 - 1) * float(cfg["coeff"])
        i = torch.arange(order + 1, device=dev)
        degree = i.view(-1, 1, 1) + i.view(1, -1, 1) + i.view(1, 1, -1)
        c = c * ((degree <= order) & (degree > 0))  # no constant term: the field leaves the mean gain near 1
        field = (
            torch.einsum(
                "bijk,id,jh,kw->bdhw", c, _legendre(D, order, dev), _legendre(H, order, dev), _legendre(W, order, dev)
            )
            .exp()
            .unsqueeze(1)
        )
        lo = _per_sample(x.flatten(1).amin(1), 5)
        return lo + (x - lo) * field

    def _intensity(self, x, cfg, gen):
        B, dev = x.shape[0], x.device
        lo, hi = _per_sample(x.flatten(1).amin(1), 5), _per_sample(x.flatten(1).amax(1), 5)
        g_lo, g_hi = cfg["gamma"]
        gamma = _per_sample(_uniform(gen, B, math.log(g_lo), math.log(g_hi), dev).exp(), 5)
        x = lo + (hi - lo) * ((x - lo) / (hi - lo + _EPS)).clamp(0, 1).pow(gamma)
        mean, std = _per_sample(x.flatten(1).mean(1), 5), _per_sample(x.flatten(1).std(1), 5)
        contrast = _per_sample(_uniform(gen, B, *cfg["contrast"], dev), 5)
        shift = _per_sample(_uniform(gen, B, *cfg["shift"], dev), 5)
        return mean + (x - mean) * contrast + shift * std

    def _histogram(self, x, cfg, gen):
        B, dev = x.shape[0], x.device
        n_lo, n_hi = (int(v) for v in cfg["control_points"])
        n = int(torch.randint(max(n_lo, 3), max(n_hi, 3) + 1, (1,), generator=self._host))
        flat = x.flatten(1)
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        u = ((flat - lo) / (hi - lo + _EPS)).clamp(0, 1)
        # control points at equal input spacing; outputs: sorted uniforms between fixed end points (monotone map)
        inner = torch.rand(B, n - 2, generator=gen, device=dev).sort(dim=1).values
        yp = torch.cat([torch.zeros(B, 1, device=dev), inner, torch.ones(B, 1, device=dev)], dim=1)
        pos = u * (n - 1)
        idx = pos.floor().clamp(max=n - 2).long()
        t = pos - idx
        y0, y1 = yp.gather(1, idx), yp.gather(1, idx + 1)
        return (lo + (hi - lo) * (y0 + t * (y1 - y0))).view_as(x)

    def _smooth(self, x, cfg, gen):
        B, C, dev = x.shape[0], x.shape[1], x.device
        s_lo, s_hi = cfg["sigma"]
        radius = max(int(math.ceil(3 * float(s_hi))), 1)
        sigma = _uniform(gen, B, s_lo, s_hi, dev).clamp_min(1e-3).repeat_interleave(C)
        t = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
        k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
        k = k / k.sum(1, keepdim=True)  # [B*C, 2r+1], one kernel per sample and channel
        h = x.reshape(1, B * C, *x.shape[2:])
        for dim in range(3):
            shape = [B * C, 1, 1, 1, 1]
            shape[2 + dim] = 2 * radius + 1
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
            h = F.conv3d(F.pad(h, pad, mode="replicate"), k.view(shape), groups=B * C)
        return h.view_as(x)

    def _noise(self, x, cfg, gen):
        B, dev = x.shape[0], x.device
        std = _per_sample(x.flatten(1).std(1), 5) * _per_sample(_uniform(gen, B, *cfg["std"], dev), 5)
        return x + std * torch.randn(x.shape, generator=gen, device=dev)
