"""The native (C++) packed binary kernels: built on first use, or None where they cannot run.

The C++ sources in ``fxquant/kernels/csrc`` compute exactly what :mod:`.reference` defines
(integer dot products ``K - 2 * popcount(a XOR w)`` over 64-bit words, then ``float(dot) *
scale + bias``), on float32 CPU inputs packed on the fly, multi-threaded with ATen's
``parallel_for`` (``torch.set_num_threads`` applies). The micro-kernel is chosen at run time
from what the CPU offers: AVX-512 VPOPCNTQ, AVX2 (``vpshufb`` popcount), the scalar ``popcnt``
instruction, or portable C++; ``FXQUANT_BINARY_ISA=portable|popcnt|avx2|avx512`` forces one
(results never depend on it: they are integers).

**Build.** Nothing is compiled at ``import fxquant``. The first binary op that can use the
kernels (a float32 CPU input), or an explicit :func:`available` call, compiles the extension
with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ``ninja``, ``pip install
fxquant[fast]``; about a minute) into ``$FXQUANT_CACHE/kernels/<key>`` (default
``~/.cache/fxquant/kernels/<key>``, the key hashing the sources, the compiler flags and the torch
and Python versions); later processes load the cached library. Two processes building at once
share torch's file lock in that directory.

**Fallback.** Where the build fails (no compiler, no ninja, an unwritable cache) or
``FXQUANT_NO_KERNELS=1`` is set, every op runs the plain-PyTorch reference and fxquant warns
once (:class:`NativeKernelWarning`) with the reason and the fix. Per call, the ops also use the
reference for inputs the kernels do not take: another dtype or device, NaN in ``x`` (the
reference keeps NaN as the prepared model does), empty tensors, dot products of 2**24 terms or more
(where float32 sums round), and convolutions with fewer than :data:`MIN_CHANNELS_PER_GROUP`
output channels per group (depthwise: the reference's float depthwise convolution is faster).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from fxquant._user_code import user_stacklevel

__all__ = ["binary_conv2d", "binary_linear", "available", "unavailable_reason", "isa",
           "cache_directory", "NativeKernelWarning", "MIN_CHANNELS_PER_GROUP"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("binary.cpp", "kernel_portable.cpp", "kernel_popcnt.cpp", "kernel_avx2.cpp",
           "kernel_avx512.cpp")
HEADERS = ("binary.h", "kernel_scalar.h")
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")  # no -march: the ISA is chosen at run time;
# -fopenmp: at::parallel_for is inline OpenMP in the headers (torch's CPU wheels), serial without
# it; at run time the extension shares torch's already loaded libgomp (same soname), so
# torch.set_num_threads applies
LDFLAGS = ("-fopenmp",)
MIN_CHANNELS_PER_GROUP = 4  # fewer output channels per group: the reference is faster
_EXACT = 2**24  # float32 sums of more +-1 terms may round: the reference defines the result

_lock = threading.Lock()
_module: ModuleType | None = None
_build_error: str | None = None  # why the build failed (tried once per process)
_warned = False


class NativeKernelWarning(RuntimeWarning):
    """The native binary kernels are unavailable: binary layers run the slower reference."""


def cache_directory() -> Path:
    """Where the extension is built: ``$FXQUANT_CACHE/kernels/<key>`` or
    ``~/.cache/fxquant/kernels/<key>`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get("FXQUANT_CACHE"):
        root = Path(os.environ["FXQUANT_CACHE"]) / "kernels"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "fxquant" / "kernels"
    return root / _key()


def _key() -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    digest.update(" ".join((*CFLAGS, *LDFLAGS, torch.__version__, sys.version)).encode())
    return digest.hexdigest()[:16]


def _disabled() -> bool:
    return os.environ.get("FXQUANT_NO_KERNELS", "") not in ("", "0")


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH: add the ninja wheel's and this Python's bin directories
    when it is not there (a venv used without activating it)."""
    if shutil.which("ninja") is not None:
        yield
        return
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja

        extra.insert(0, getattr(ninja, "BIN_DIR", os.path.dirname(ninja.__file__)))
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([*extra, *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


def _build() -> ModuleType | None:
    """The loaded extension, compiling it on the first call; None (reason kept) if that fails."""
    global _module, _build_error
    if _module is not None or _build_error is not None:
        return _module
    with _lock:
        if _module is not None or _build_error is not None:
            return _module
        try:
            from torch.utils import cpp_extension

            directory = cache_directory()
            directory.mkdir(parents=True, exist_ok=True)
            with _ninja_on_path(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _module = cpp_extension.load(
                    name=f"fxquant_binary_{directory.name}",
                    sources=[str(CSRC / name) for name in SOURCES],
                    extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                    build_directory=str(directory), verbose=False)
        except Exception as error:  # noqa: BLE001 - any build failure means "use the reference"
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            _build_error = f"{type(error).__name__}: {lines[-1] if lines else error!r}"
        return _module


def unavailable_reason() -> str | None:
    """Why the native kernels do not run (None when they do); builds them if not yet tried."""
    if _disabled():
        return "FXQUANT_NO_KERNELS is set"
    _build()
    return _build_error


def available() -> bool:
    """Whether the native kernels are built and loaded (compiles them on the first call)."""
    return unavailable_reason() is None


def isa() -> str | None:
    """The micro-kernel the next call runs (``avx512``, ``avx2``, ``popcnt``, ``portable``), or
    None where the native kernels are unavailable."""
    return _build().selected_isa() if available() else None


def _module_or_warn() -> ModuleType | None:
    global _warned
    reason = unavailable_reason()
    if reason is None:
        return _module
    if not _warned:
        _warned = True
        fix = ("unset FXQUANT_NO_KERNELS" if _disabled() else
               "install a C++ compiler and ninja (pip install 'fxquant[fast]'), then restart")
        warnings.warn(f"fxquant: the native binary kernels are unavailable ({reason}); binary "
                      "conv2d/linear layers run the plain-PyTorch reference (float operations "
                      f"on unpacked weights), which is several times slower. Fix: {fix}.",
                      NativeKernelWarning, stacklevel=user_stacklevel())
    return None


def _cpu_float(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None) -> bool:
    tensors = (x, weight_bits, scale) if bias is None else (x, weight_bits, scale, bias)
    return (x.dtype == torch.float32 and weight_bits.dtype == torch.uint8
            and all(t.device.type == "cpu" for t in tensors) and x.numel() > 0
            and weight_bits.numel() > 0)


def _float32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def binary_conv2d(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int
                  ) -> Tensor | None:
    """The native binary convolution, or None where the reference must run."""
    if not (_cpu_float(x, weight_bits, scale, bias) and x.dim() == 4 and weight_bits.dim() == 4
            and groups > 0 and x.shape[1] % groups == 0 and weight_bits.shape[0] % groups == 0
            and weight_bits.shape[0] // groups >= MIN_CHANNELS_PER_GROUP
            and weight_bits.shape[1] * weight_bits.shape[2] * (x.shape[1] // groups) < _EXACT
            and weight_bits.shape[3] == -(-(x.shape[1] // groups) // 8)
            and scale.numel() == weight_bits.shape[0]
            and (bias is None or bias.numel() == weight_bits.shape[0])):
        return None
    if not len(stride) == len(padding) == len(dilation) == 2:
        return None
    kh, kw = weight_bits.shape[1], weight_bits.shape[2]
    for size, k, s, p, d in zip(x.shape[2:], (kh, kw), stride, padding, dilation, strict=True):
        if s < 1 or d < 1 or p < 0 or size + 2 * p - d * (k - 1) - 1 < 0:
            return None
    module = _module_or_warn()
    if module is None:
        return None
    return module.conv2d(x.detach(), weight_bits.contiguous(), _float32(scale), _float32(bias),
                         list(stride), list(padding), list(dilation), groups)


def binary_linear(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None
                  ) -> Tensor | None:
    """The native binary linear layer, or None where the reference must run."""
    if not (_cpu_float(x, weight_bits, scale, bias) and x.dim() >= 1 and weight_bits.dim() == 2
            and weight_bits.shape[1] == -(-x.shape[-1] // 8) and x.shape[-1] < _EXACT
            and scale.numel() == weight_bits.shape[0]
            and (bias is None or bias.numel() == weight_bits.shape[0])):
        return None
    module = _module_or_warn()
    if module is None:
        return None
    return module.linear(x.detach(), weight_bits.contiguous(), _float32(scale), _float32(bias))
