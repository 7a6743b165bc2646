"""SW-MLP (static sparse-weight MLP) and the dense MLP on ``vec X``, arranged like the Mixer (docs/theory.md §4.2).

Golubeva, Neyshabur & Gur-Ari, "Are wider nets better given the same number of parameters?", ICLR 2021
(official code: google-research/wide-sparse-nets); Hayase & Karakida, ICML 2024, arXiv:2306.01470.

Architecture [choice, docs/theory.md §4.2]: the Mixer's patch embedding ``(B, in_chans, H, W) -> X (B, S, C)``, then
``depth`` blocks of two masked MLPs on ``x = vec X`` (column-major, width ``m = S*C``), each ``m -> γm -> m``
with the activation between, placed where the Mixer has its token and its channel MLP, with the Mixer's
pre-norm residual arrangement:

    vec U = vec X + fc2_t(act(fc1_t(vec LN(X)))),     vec Y = vec U + fc2_c(act(fc1_c(vec LN(U))))

``norm="token"`` (default) is the Mixer's LayerNorm per token over C in the (S, C) layout; ``norm="vec"``
normalises over all m features; ``norm=None`` has none. Then the final LayerNorm, token-mean pooling and the
linear head, as in the Mixer (dense, not counted in Ω). Blocks have the Mixer's attribute names
(``norm1``, ``mlp_tokens``, ``norm2``, ``mlp_channels``), so ``widesparse.effective.to_wide_mlp`` applies as is.

Sizes (docs/theory.md (10)): S comes from ``image_size``/``patch_size``; hidden widths ``γ_t m`` (token position) and
``γ_c m`` (channel position). Exactly one way to fix C and p:

* matched to a Mixer (default, or ``match="mixer"``): C = ``dim``, so m = SC; ``token_hidden``/``channel_hidden``
  are the Mixer's D_S/D_C (γ_t = D_S/S, γ_c = D_C/C, hidden widths D_S·C and D_C·S); density
  p = (γ_t/C + γ_c/S)/(γ_t + γ_c), which is (1/S + 1/C)/2 when γ_t = γ_c and always gives the Mixer's Ω.
* ``width`` (m, a multiple of S) and ``density``; or ``dim`` and ``density``.
* a connection budget ``omega`` with ``density`` (m = √(Ω/(γ̄p)), γ̄ = (γ_t+γ_c)/2, C = round(m/S)) or with
  ``width`` (p = Ω/(γ̄ m²)).

``gamma`` sets γ_t = γ_c; otherwise ``token_expansion``/``channel_expansion`` (default 2 and 4, as the Mixer).
``backend="sparse"`` (default) stores connections only (:class:`~widesparse.layers.sparse.SparseLinear`),
``"masked"`` a dense weight times a mask. ``mlp`` is the dense MLP: the same model at p = 1.

Seeds (:mod:`widesparse.models.seeds`): ``seed`` fixes the masks only, as does ``mask_seed``, which overrides it.
The weights come from the global torch RNG unless ``init_seed`` is given; then from a generator seeded with it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from widesparse.budget import density as mixer_density
from widesparse.budget import sw_mlp_width
from widesparse.layers.activation import resolve_act_layer
from widesparse.layers.drop import DropPath, drop_path_rates
from widesparse.layers.init import lecun_normal_
from widesparse.layers.norm import LayerNorm
from widesparse.layers.patch_embed import PatchEmbed
from widesparse.layers.sparse import InitRule, MaskedLinear, MaskKind, SparseLinear
from widesparse.models.base import MixerSurface
from widesparse.models.blocks import TwoSublayerBlock
from widesparse.models.registry import register_preset
from widesparse.models.seeds import draw_, init_generator, layer_seeds

__all__ = ["SwMlp", "SparseMlp", "SwBlock", "resolve_sw_sizes", "SwSizes"]

Backend = Literal["sparse", "masked"]
NormKind = Literal["token", "vec"] | None
_BACKENDS: dict[str, type[MaskedLinear] | type[SparseLinear]] = {"sparse": SparseLinear, "masked": MaskedLinear}


class SparseMlp(nn.Module):
    """``x -> fc2(act(fc1(x)))`` on vectors of width ``m`` with masked layers ``m -> hidden -> m``."""

    def __init__(self, width: int, hidden: int, layer: Callable[..., nn.Module], act_layer: Callable[[], nn.Module],
                 seeds: tuple[int, int]) -> None:
        super().__init__()
        self.fc1 = layer(width, hidden, seed=seeds[0])
        self.act = act_layer()
        self.fc2 = layer(hidden, width, seed=seeds[1])

    @property
    def layers(self) -> list[nn.Module]:
        """The two masked linear maps in order."""
        return [self.fc1, self.fc2]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwBlock(TwoSublayerBlock):
    """Two residual masked MLPs on ``vec X`` at the Mixer's token and channel positions (``(B, S, C)`` in and out)."""

    def __init__(self, num_tokens: int, dim: int, hidden: tuple[int, int], layer: Callable[..., nn.Module],
                 act_layer: Callable[[], nn.Module], norm_layer: Callable[[], nn.Module] | None, drop_path: float,
                 drop_path_rescale: bool, seeds: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.num_tokens, self.dim, self.residual, self.act = num_tokens, dim, True, None
        m = num_tokens * dim
        self.norm1 = norm_layer() if norm_layer is not None else nn.Identity()
        self.mlp_tokens = SparseMlp(m, hidden[0], layer, act_layer, seeds[:2])
        self.norm2 = norm_layer() if norm_layer is not None else nn.Identity()
        self.mlp_channels = SparseMlp(m, hidden[1], layer, act_layer, seeds[2:])
        self.drop_path = DropPath(drop_path, drop_path_rescale) if drop_path > 0 else nn.Identity()

    def _step(self, x: Tensor, norm: nn.Module, mlp: SparseMlp) -> Tensor:
        B, S, C = x.shape
        h = mlp(norm(x).transpose(1, 2).reshape(B, S * C))  # vec: column-major over (S, C)
        return x + self.drop_path(h.reshape(B, C, S).transpose(1, 2))


class SwSizes:
    """Resolved sizes: tokens S, channels C, width m = SC, expansions, hidden widths, density p, expected Ω."""

    def __init__(self, S: int, C: int, gammas: tuple[float, float], hidden: tuple[int, int], p: float) -> None:
        self.S, self.C, self.m, self.gammas, self.hidden, self.p = S, C, S * C, gammas, hidden, p
        self.omega = p * self.m * (hidden[0] + hidden[1]) / 2  # expected connections per masked layer (10)

    def __repr__(self) -> str:
        return (f"SwSizes(S={self.S}, C={self.C}, m={self.m}, gammas={self.gammas}, hidden={self.hidden}, "
                f"p={self.p:.6g}, omega={self.omega:.6g})")


def resolve_sw_sizes(
    S: int, *, dim: int | None = None, width: int | None = None, density: float | None = None,
    omega: float | None = None, gamma: float | None = None, match: str | None = None,
    token_expansion: float | None = None, channel_expansion: float | None = None,
    token_hidden: int | None = None, channel_hidden: int | None = None, default_dim: int = 32,
) -> SwSizes:
    """Turn the size arguments of ``sw_mlp``/``mlp`` into :class:`SwSizes` (see the module docstring)."""
    if match not in (None, "mixer"):
        raise ValueError(f"unknown match {match!r}; valid: 'mixer'")
    if density is not None and (isinstance(density, bool) or not 0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if match == "mixer" and (density is not None or width is not None or omega is not None):
        raise ValueError("match='mixer' fixes m = S*dim and p = (1/S + 1/C)/2; do not also give density, width "
                         f"or omega (got density={density}, width={width}, omega={omega})")
    if gamma is not None and any(v is not None for v in (token_expansion, channel_expansion, token_hidden,
                                                         channel_hidden)):
        raise ValueError("give either gamma or token_/channel_expansion / token_/channel_hidden, not both")
    if (token_hidden is not None or channel_hidden is not None) and (width is not None or omega is not None):
        raise ValueError("token_hidden/channel_hidden are a matched Mixer's D_S/D_C: use them with dim, "
                         "not with width or omega (use gamma or token_/channel_expansion there)")
    g_t = float(gamma if gamma is not None else token_expansion if token_expansion is not None else 2.0)
    g_c = float(gamma if gamma is not None else channel_expansion if channel_expansion is not None else 4.0)
    for name, v in (("token expansion", g_t), ("channel expansion", g_c)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")
    g_mean = (g_t + g_c) / 2
    if omega is not None:
        if isinstance(omega, bool) or not float(omega) > 0:
            raise ValueError(f"omega must be a positive number of connections, got {omega!r}")
        if (density is None) == (width is None):
            raise ValueError("with omega give exactly one of density (then m = sqrt(omega/(gamma p))) or width "
                             f"(then p = omega/(gamma m^2)); got density={density}, width={width}")
        if density is not None:
            m_real = sw_mlp_width(omega, g_mean, density)
            C = round(m_real / S)
            if dim is not None and dim != C:
                raise ValueError(f"omega={omega:g} and density={density:g} give C = {C}, but dim = {dim}; give one")
            if m_real < S:
                raise ValueError(f"budget too small: omega={omega:g} with gamma={g_mean:g}, density={density:g} "
                                 f"gives width m = {m_real:.1f} < S = {S} tokens (need omega >= "
                                 f"{g_mean * float(density) * S * S:g})")
    if width is not None:
        if isinstance(width, bool) or int(width) != width or width < 1 or width % S:
            raise ValueError(f"width m must be a positive multiple of the number of tokens S = {S}, got {width!r}")
        C = int(width) // S
        if dim is not None and dim != C:
            raise ValueError(f"width {width} = S*C gives C = {C} but dim = {dim}; give one of them")
        if omega is not None:
            density = float(omega) / (g_mean * width * width)
            if density > 1:
                raise ValueError(f"omega={omega:g} exceeds the dense count gamma*m^2 = {g_mean * width * width:g} "
                                 f"at width {width}")
            if density * width < 1:
                raise ValueError(f"budget too small for width {width}: omega={omega:g} gives density {density:.3g}, "
                                 f"{density * width:.3g} connections per unit (< 1); need omega >= "
                                 f"{g_mean * width:g}")
    elif omega is None:
        C = int(dim) if dim is not None else default_dim
    if not isinstance(C, int) or C < 1:
        raise ValueError(f"dim must be a positive integer, got {C!r}")
    if token_hidden is not None:
        g_t = _hidden_int(token_hidden, "token_hidden") / S
    if channel_hidden is not None:
        g_c = _hidden_int(channel_hidden, "channel_hidden") / C
    m = S * C
    hidden = (max(1, round(g_t * m)), max(1, round(g_c * m)))
    if density is None:  # matched to the Mixer with these S, C, D_S, D_C: equal Omega (10)
        density = (g_t / C + g_c / S) / (g_t + g_c) if g_t != g_c else mixer_density(S, C)
    return SwSizes(S, C, (g_t, g_c), hidden, float(density))


def _hidden_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class SwMlp(MixerSurface):
    """SW-MLP on images: patch embedding, ``depth`` blocks of two masked MLPs on vec X, LN, token mean, head.

    ``seed``/``mask_seed`` fix the masks, ``init_seed`` the weights (module docstring, "Seeds").
    """

    def __init__(
        self, num_classes: int = 10, image_size: int | tuple[int, int] = 32, patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3, dim: int | None = None, depth: int = 4, *, width: int | None = None,
        density: float | None = None, omega: float | None = None, gamma: float | None = None,
        match: str | None = None, token_expansion: float | None = None, channel_expansion: float | None = None,
        token_hidden: int | None = None, channel_hidden: int | None = None, backend: Backend = "sparse",
        mask: MaskKind = "bernoulli", init: InitRule = "golubeva", act_layer: str | Callable[[], nn.Module] = "gelu",
        norm: NormKind = "token", seed: int = 0, mask_seed: int | None = None, init_seed: int | None = None,
        drop_path_rate: float = 0.0,
        drop_path_schedule: Literal["linear", "uniform"] = "linear", drop_path_rescale: bool = True,
        head_bias: float = 0.0, ln_eps: float = 1e-6, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(_BACKENDS)}")
        if norm not in ("token", "vec", None):
            raise ValueError(f"unknown norm {norm!r}; valid: 'token', 'vec', None")
        if depth < 1 or num_classes < 0:
            raise ValueError(f"need depth >= 1 and num_classes >= 0; got {depth}, {num_classes}")
        fk = {"device": device, "dtype": dtype}
        S = PatchEmbed(image_size, patch_size, in_chans, 1, device="meta").num_patches
        self.sizes = resolve_sw_sizes(
            S, dim=dim, width=width, density=density, omega=omega, gamma=gamma, match=match,
            token_expansion=token_expansion, channel_expansion=channel_expansion, token_hidden=token_hidden,
            channel_hidden=channel_hidden,
        )
        C = self.sizes.C
        self.stem = PatchEmbed(image_size, patch_size, in_chans, C, **fk)
        self.num_tokens, self.dim, self.num_features, self.num_classes = S, C, C, num_classes
        self.width, self.density, self.backend = S * C, self.sizes.p, backend
        g = init_generator(init_seed)
        layer = partial(_BACKENDS[backend], density=self.sizes.p, mask=mask, init=init, generator=g, **fk)
        ln = partial(LayerNorm, eps=ln_eps, **fk)
        norm_layer = None if norm is None else partial(ln, C) if norm == "token" else partial(ln, (S, C))
        act = resolve_act_layer(act_layer)
        rates = drop_path_rates(drop_path_rate, depth, drop_path_schedule)
        self.blocks = nn.Sequential(*[
            SwBlock(S, C, self.sizes.hidden, layer, act, norm_layer, rates[i], drop_path_rescale,
                    layer_seeds(seed if mask_seed is None else mask_seed, i, 4, 7))
            for i in range(depth)
        ])
        self.norm = ln(C)
        self.head = nn.Linear(C, num_classes, **fk) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_rest(head_bias, g)

    def _init_rest(self, head_bias: float, generator: torch.Generator | None = None) -> None:
        """Mixer init outside the masked layers: LeCun-normal stem, LayerNorm 1/0, zero head (bias ``head_bias``)."""
        with torch.no_grad():
            if self.stem.proj.weight.is_meta:
                return
            draw_(self.stem.proj.weight, lecun_normal_, generator)
            nn.init.zeros_(self.stem.proj.bias)
            if isinstance(self.head, nn.Linear):
                nn.init.zeros_(self.head.weight)
                nn.init.constant_(self.head.bias, head_bias)


# ------------------------------------------------------------------------------------------------ registry
def _dense_only(kwargs: dict[str, Any]) -> None:
    if kwargs.get("density", 1.0) != 1.0:
        raise ValueError(f"mlp is the dense MLP (density 1); got density={kwargs['density']}: use sw_mlp")


register_preset(
    "sw_mlp", SwMlp, {},
    "SW-MLP (docs/theory.md §4.2): masked MLPs m -> γm -> m on vec X in the Mixer's arrangement; default backend "
    "sparse.\n\nDefault: matched to the Mixer with the same ``image_size``, ``patch_size``, ``dim`` (m = SC, equal Ω).",
)
register_preset("mlp", SwMlp, {"density": 1.0, "backend": "masked"},
                "The dense MLP on vec X: the SW-MLP at density 1 (dense layers, no mask).", check=_dense_only)
