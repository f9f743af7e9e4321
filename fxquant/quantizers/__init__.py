"""The quantizer library: pure autograd functions plus thin leaf modules, one file per family.

``get(name, **kwargs)`` builds a module from its registry name; ``names()`` lists the names.
"""

from fxquant.quantizers.base import Quantizer, check_floating, get, names, register
from fxquant.quantizers.fixed_point import fixed_point_quantize, fixed_point_quantize_mask
from fxquant.quantizers.kbit import (
    AffineKBitQuantize,
    CeilSTE,
    ClampByLinear,
    ClampSTE,
    DoReFa,
    FloorSTE,
    KBitQuantize,
    RoundSTE,
    StepQuantize,
    affine_k_bit_quantize,
    ceil_ste,
    clamp_by_linear,
    clamp_ste,
    dorefa,
    floor_ste,
    k_bit_quantize,
    round_ste,
    step_quantize,
)
from fxquant.quantizers.sign import (
    ApproxSign,
    MagnitudeAwareSign,
    ProgressiveSign,
    SteHeaviside,
    SteSign,
    SwishSign,
    approx_sign,
    get_progressive_sign_scale,
    magnitude_aware_sign,
    set_progressive_sign_scale,
    ste_heaviside,
    ste_sign,
    swish_sign,
)
from fxquant.quantizers.ternary import SteTern, ste_tern

__all__ = [
    "Quantizer", "check_floating", "get", "names", "register",
    "fixed_point_quantize", "fixed_point_quantize_mask",
    "ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign", "ste_heaviside",
    "SteSign", "ApproxSign", "SwishSign", "MagnitudeAwareSign", "SteHeaviside", "ProgressiveSign",
    "get_progressive_sign_scale", "set_progressive_sign_scale",
    "ste_tern", "SteTern",
    "round_ste", "ceil_ste", "floor_ste", "clamp_ste", "step_quantize", "k_bit_quantize",
    "affine_k_bit_quantize", "clamp_by_linear", "dorefa",
    "RoundSTE", "CeilSTE", "FloorSTE", "ClampSTE", "StepQuantize", "KBitQuantize",
    "AffineKBitQuantize", "ClampByLinear", "DoReFa",
]
