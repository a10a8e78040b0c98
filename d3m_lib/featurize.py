"""Factorized TRAK features: projected per-example gradients that are never formed.

For a Conv2d/Linear layer the per-example weight gradient is ``sum_s G_s A_s^T``
(``A_s``: the unfolded input patch at output position ``s``, ``G_s``: the gradient of the
margin w.r.t. the layer output there). Projected with a Kronecker matrix
``P_out (x) P_in`` it is ``sum_s (P_out^T G_s)(P_in^T A_s)^T`` (LoGra, arXiv 2405.13954):
project the output gradients with ``P_out`` (a 1x1 convolution), the inputs with
``P_in`` (a convolution with ``k_in`` output channels and the layer's own kernel,
stride, padding and dilation), and sum their outer products over positions. One batched
forward and one backward of the summed margins give every example's features: the
examples do not interact because the model runs in eval mode.

Other parameters (BatchNorm weight/bias, conv and linear biases) have per-example
gradients of a few numbers per channel; they are computed exactly through the same hooks
(BatchNorm in eval mode is ``y = gamma * xhat + beta``) and projected together with one
dense Gaussian matrix. A module type with parameters of its own that is neither of these
is refused (use ``trak_featurizer="traker"``).

Scale: every block is scaled so that ``E <f(g), f(h)> = p <g, h>`` (``p`` = total
dimension), as for traker's dense Gaussian projection, so lambda_reg means the same on
both paths. The total ``p`` is split over blocks in proportion to each block's mean
squared per-example gradient norm on a calibration batch (exact gradients of a few
images): for independent Gaussian blocks the variance of the inner-product estimate is
about ``sum_l |g_l|^2 |h_l|^2 / k_l``, smallest for ``k_l`` proportional to ``|g_l||h_l|``.
The split is part of the featurizer's state (:meth:`FactorizedFeaturizer.plan`) and is
saved with the features so that targets and resumed runs use the same projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CALIBRATION_IMAGES = 16  # images whose exact per-example gradients set the dimension split


@dataclass
class KronBlock:
    """One Conv2d/Linear weight: ``k_out x k_in`` features (a side with ``k == d`` is exact)."""

    name: str
    d_out: int
    d_in: int
    k_out: int
    k_in: int

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in


def _seeded_normal(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """N(0, 1) matrix from a CPU generator: identical on every machine and device."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _factor(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out * k_in <= k``, near square, within the layer's sizes."""
    if k <= 0:
        return 0, 0
    k_out = max(1, min(d_out, int(round(math.sqrt(k)))))
    k_in = max(1, min(d_in, k // k_out))
    if k_in == d_in:  # the input side is exact: give the rest to the output side
        k_out = max(1, min(d_out, k // k_in))
    return k_out, k_in


class FactorizedFeaturizer:
    """Projected per-example gradients of ``sum (2y-1) * logit`` via hooks on ``model``.

    Args:
        model: the model (its current weights are used; call :meth:`plan` per checkpoint).
        proj_dim: total feature dimension ``p``.
        seed: seeds every projection matrix.
    """

    def __init__(self, model: nn.Module, proj_dim: int, seed: int = 0):
        self.model = model
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.layers: list[tuple[str, nn.Module]] = []
        self.vector_params: list[tuple[str, nn.Module, str]] = []  # (module name, module, "weight"/"bias")
        covered = set()
        for name, mod in model.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
                    raise NotImplementedError(f"factorized featurizer: conv {name} has groups="
                                              f"{mod.groups}, padding_mode={mod.padding_mode!r}; "
                                              "use trak_featurizer='traker'")
                self.layers.append((name, mod))
                covered.add(id(mod.weight))
                if mod.bias is not None:
                    self.vector_params.append((name, mod, "bias"))
                    covered.add(id(mod.bias))
            elif isinstance(mod, _BN) and mod.affine and mod.track_running_stats:
                for kind in ("weight", "bias"):
                    self.vector_params.append((name, mod, kind))
                    covered.add(id(getattr(mod, kind)))
            other = [n for n, p in own.items() if id(p) not in covered]
            if other:
                raise NotImplementedError(f"factorized featurizer: module {name or '<root>'} "
                                          f"({type(mod).__name__}) has parameters {other} it cannot "
                                          "handle; use trak_featurizer='traker'")
        self.d_vec = sum(getattr(m, k).numel() for _, m, k in self.vector_params)
        n_params = sum(p.numel() for p in model.parameters())
        if not 0 < self.proj_dim <= n_params:
            raise ValueError(f"trak_proj_dim={proj_dim} must be in [1, {n_params}] (parameters)")
        self.blocks: list[KronBlock] | None = None
        self.k_vec = 0
        self._mats: dict = {}
        self._last = None

    # -- the dimension split ------------------------------------------------
    def _dims(self, mod: nn.Module) -> tuple[int, int]:
        w = mod.weight
        return w.shape[0], int(np.prod(w.shape[1:]))

    def energies(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Mean squared per-example gradient norm of each layer weight, then of the vector params."""
        model = self.model.eval()
        params = [m.weight for _, m in self.layers] + [getattr(m, k) for _, m, k in self.vector_params]
        out = np.zeros(len(self.layers) + 1)
        for i in range(len(x)):
            margin = ((2.0 * y[i] - 1.0) * model(x[i:i + 1]).reshape(())).float()
            grads = torch.autograd.grad(margin, params, allow_unused=True)
            sq = [0.0 if g is None else float(g.double().pow(2).sum()) for g in grads]
            out[:len(self.layers)] += sq[:len(self.layers)]
            out[-1] += sum(sq[len(self.layers):])
        return out / max(1, len(x))

    def plan(self, energy: Sequence[float] | None = None) -> dict:
        """Split ``proj_dim`` over the blocks (proportional to ``energy``; equal if None).

        Returns the plan (JSON-able); :meth:`set_plan` restores it.
        """
        L = len(self.layers)
        caps = [a * b for a, b in (self._dims(m) for _, m in self.layers)] + [self.d_vec]
        e = np.ones(L + 1) if energy is None else np.asarray(energy, dtype=np.float64).copy()
        if len(e) != L + 1:
            raise ValueError(f"energy has {len(e)} entries, expected {L + 1}")
        e[-1] = e[-1] if self.d_vec else 0.0
        e = np.where(np.isfinite(e) & (e > 0), e, 0.0)
        if e.sum() == 0:
            e = np.array([1.0] * L + [1.0 if self.d_vec else 0.0])
        # proportional split, capped at each block's size; a floor of 1 per weight block
        # where proj_dim allows (below that, low-energy layers get none)
        k = np.zeros(L + 1, dtype=np.int64)
        active = np.array([c > 0 for c in caps])
        if self.proj_dim >= L:
            k[:L] = 1
        left = self.proj_dim - int(k.sum())
        while left > 0 and active.any():
            share = e * active
            if share.sum() == 0:
                share = active.astype(float)
            want = np.floor(left * share / share.sum()).astype(np.int64)
            if want.sum() == 0:
                want[np.argmax(share)] = 1
            room = np.array(caps) - k
            add = np.minimum(want, room)
            k += add
            left -= int(add.sum())
            active &= (np.array(caps) - k) > 0
        blocks = []
        for (name, mod), kl in zip(self.layers, k[:L]):
            d_out, d_in = self._dims(mod)
            blocks.append(KronBlock(name, d_out, d_in, *_factor(int(kl), d_out, d_in)))
        k_vec = int(k[L])
        left = self.proj_dim - sum(b.dim for b in blocks) - k_vec
        # factoring rounds down; the vector block, then single-row weight blocks, take the rest
        add = min(left, self.d_vec - k_vec)
        k_vec, left = k_vec + add, left - add
        for b in sorted(blocks, key=lambda b: -b.d_in):
            while b.dim and left >= b.k_out and b.k_in < b.d_in:
                b.k_in += 1
                left -= b.k_out
        if left:
            for b in blocks:
                if left and b.k_out <= 1 and b.k_in < b.d_in:
                    b.k_out = 1
                    step = min(left, b.d_in - b.k_in)
                    b.k_in += step
                    left -= step
        for b in sorted(blocks, key=lambda b: -b.dim):  # re-factor one block to take the rest
            t = b.dim + left
            pairs = [(ko, t // ko) for ko in range(1, min(b.d_out, t) + 1)
                     if t % ko == 0 and t // ko <= b.d_in]
            if left and b.dim and pairs:
                b.k_out, b.k_in = min(pairs, key=lambda kk: abs(math.log(kk[0] / kk[1])))
                left = 0
        if left:
            raise ValueError(f"cannot split trak_proj_dim={self.proj_dim} over this model's layers "
                             f"exactly ({left} dimensions left); choose another trak_proj_dim")
        plan = {"proj_dim": self.proj_dim, "seed": self.seed, "k_vec": k_vec,
                "blocks": [[b.name, b.k_out, b.k_in] for b in blocks]}
        self.set_plan(plan)
        return plan

    def set_plan(self, plan: dict) -> None:
        """Use a plan from :meth:`plan` (for example one saved with the features)."""
        if int(plan["proj_dim"]) != self.proj_dim or int(plan["seed"]) != self.seed:
            raise ValueError(f"featurizer plan is for proj_dim={plan['proj_dim']}, seed={plan['seed']}; "
                             f"this featurizer has {self.proj_dim}, {self.seed}")
        names = [n for n, _ in self.layers]
        if [b[0] for b in plan["blocks"]] != names:
            raise ValueError("featurizer plan was made for a model with other layers")
        blocks = []
        for (name, mod), (_, ko, ki) in zip(self.layers, plan["blocks"]):
            d_out, d_in = self._dims(mod)
            blocks.append(KronBlock(name, d_out, d_in, int(ko), int(ki)))
        self.blocks, self.k_vec = blocks, int(plan["k_vec"])
        if sum(b.dim for b in blocks) + self.k_vec != self.proj_dim:
            raise ValueError("featurizer plan does not add up to proj_dim")
        self._mats = {}

    # -- projection matrices -------------------------------------------------
    def _mat(self, key, index, shape, exact: bool, device) -> torch.Tensor | None:
        """Cached Gaussian (``None`` where the side is exact)."""
        if exact:
            return None
        ck = (key, str(device))
        if ck not in self._mats:
            self._mats[ck] = _seeded_normal(self.seed, index, shape).to(device)
        return self._mats[ck]

    def _scale(self, b: KronBlock) -> float:
        eff = (1 if b.k_out == b.d_out else b.k_out) * (1 if b.k_in == b.d_in else b.k_in)
        return math.sqrt(self.proj_dim / eff)

    # -- features ------------------------------------------------------------
    def features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B, proj_dim)`` projected gradients of each example's margin ``(2y-1) * logit``."""
        if self.blocks is None:
            self.plan()
        model, dev = self.model.eval(), x.device
        B = x.shape[0]
        out = torch.zeros(B, self.proj_dim, dtype=torch.float32, device=dev)
        vec = torch.zeros(B, self.d_vec, dtype=torch.float32, device=dev) if self.k_vec else None
        offsets = np.cumsum([0] + [b.dim for b in self.blocks])
        vec_off, pos = {}, 0
        for name, mod, kind in self.vector_params:
            vec_off[(name, kind)] = pos
            pos += getattr(mod, kind).numel()
        saved_in: dict[str, torch.Tensor] = {}
        handles, inplace = [], []

        def kron_forward(i, b, mod):
            def hook(_m, inp, output):
                if not b.dim:
                    if mod.bias is not None and vec is not None:
                        output.register_hook(bias_only(b, mod))
                    return
                a = inp[0].detach()
                p_in = self._mat(("in", i), 2 * i, (b.k_in, b.d_in), b.k_in == b.d_in, dev)
                if isinstance(mod, nn.Conv2d):
                    w = (torch.eye(b.d_in, device=dev, dtype=a.dtype) if p_in is None
                         else p_in.to(a.dtype)).reshape(b.k_in, *mod.weight.shape[1:])
                    ap = F.conv2d(a, w, None, mod.stride, mod.padding, mod.dilation).flatten(2)
                else:
                    a = a.reshape(B, -1, b.d_in)
                    ap = (a if p_in is None else a @ p_in.to(a.dtype).T).transpose(1, 2)
                saved_in[b.name] = ap  # (B, k_in, S)

                def grad_hook(g):
                    g = g.detach()
                    gf = g.flatten(2) if isinstance(mod, nn.Conv2d) else g.reshape(B, -1, b.d_out).transpose(1, 2)
                    if mod.bias is not None and vec is not None:
                        o = vec_off[(b.name, "bias")]
                        vec[:, o:o + b.d_out] = gf.sum(2).float()
                    p_out = self._mat(("out", i), 2 * i + 1, (b.k_out, b.d_out), b.k_out == b.d_out, dev)
                    gp = gf if p_out is None else torch.matmul(p_out.to(gf.dtype), gf)  # (B, k_out, S)
                    f = torch.bmm(gp.float(), saved_in.pop(b.name).float().transpose(1, 2))
                    out[:, offsets[i]:offsets[i + 1]] = f.reshape(B, -1) * self._scale(b)
                output.register_hook(grad_hook)
            return hook

        def bias_only(b, mod):
            def grad_hook(g):
                gf = g.detach().flatten(2) if isinstance(mod, nn.Conv2d) else \
                    g.detach().reshape(B, -1, b.d_out).transpose(1, 2)
                o = vec_off[(b.name, "bias")]
                vec[:, o:o + b.d_out] = gf.sum(2).float()
            return grad_hook

        def bn_forward(name, mod):
            def hook(_m, inp, output):
                a = inp[0].detach()
                shape = (1, -1) + (1,) * (a.dim() - 2)
                xhat = (a - mod.running_mean.reshape(shape)) * torch.rsqrt(
                    mod.running_var.reshape(shape) + mod.eps)

                def grad_hook(g):
                    g = g.detach().float()
                    dims = tuple(range(2, g.dim()))
                    o = vec_off[(name, "weight")]
                    vec[:, o:o + g.shape[1]] = (g * xhat).sum(dims) if dims else g * xhat
                    o = vec_off[(name, "bias")]
                    vec[:, o:o + g.shape[1]] = g.sum(dims) if dims else g
                output.register_hook(grad_hook)
            return hook

        try:
            for m in model.modules():  # in-place ops would overwrite tensors the hooks hold
                if getattr(m, "inplace", False) is True:
                    m.inplace = False
                    inplace.append(m)
            for i, (b, (_, mod)) in enumerate(zip(self.blocks, self.layers)):
                handles.append(mod.register_forward_hook(kron_forward(i, b, mod)))
            if self.k_vec:
                for name, mod in model.named_modules():
                    if isinstance(mod, _BN) and any(n == name for n, _, _ in self.vector_params):
                        handles.append(mod.register_forward_hook(bn_forward(name, mod)))
            req = [p.requires_grad for p in model.parameters()]
            for p in model.parameters():
                p.requires_grad_(False)
            try:
                xi = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = model(xi).reshape(B, -1)
                    if logits.shape[1] != 1:
                        raise ValueError(f"factorized featurizer needs one logit, got {logits.shape[1]}")
                    margins = (2.0 * y.reshape(-1).to(logits.dtype) - 1.0) * logits[:, 0]
                    torch.autograd.grad(margins.sum(), xi)
            finally:
                for p, r in zip(model.parameters(), req):
                    p.requires_grad_(r)
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True
            saved_in.clear()
        if self.k_vec:
            p_vec = self._mat(("vec",), 1_000_000, (self.k_vec, self.d_vec), self.k_vec == self.d_vec, dev)
            s = math.sqrt(self.proj_dim / (1 if p_vec is None else self.k_vec))
            out[:, -self.k_vec:] = (vec if p_vec is None else vec @ p_vec.T) * s
        self._last = (x, margins.detach().float())
        return out

    def last_margins(self, x: torch.Tensor) -> torch.Tensor | None:
        """Margins of the last :meth:`features` batch if ``x`` is that batch (saves a forward)."""
        return self._last[1] if self._last is not None and self._last[0] is x else None
