"""The compressed copy of a linear layer's input: what the forward saves and how the backward
reads it, for every format, in one place.

A site's copy has a *layout* and a *format*.

Layouts (``LAYOUTS``), over ``x2d`` (N, n), the input flattened to rows:

- ``"project"``: PRAC (arXiv 2602.23111), ``x2d @ P`` with ``P = [Q1, sqrt(k) Q2]`` (N, r);
  with a format it is quantized. ``dW = (dY^T c) P^T`` with ``c`` the decoded copy.
- ``"identity"``: ``x2d`` itself, quantized (a rank covering the whole width with ``bits``):
  no basis, no Gram, no refit. ``dW = dY^T decode(q(x2d))``.
- ``"residual"``: a principal part ``x2d @ Q1`` (N, r1), kept in 16 bits, beside the quantized
  residual ``R = x2d - (x2d Q1)~ Q1^T``, where ``(x2d Q1)~`` is the principal part *as kept*
  (rounded to 16 bits), so that the two add up to ``x2d`` before quantization.
  ``dW = (dY^T (x2d Q1)~) Q1^T + dY^T decode(q(R))``. R exists only inside the forward's
  compress kernel.

Formats (``Format``): ``bits`` None (the input's dtype, as PRAC always did), ``8``, ``4`` or ``2``
(integers with stochastic rounding), or ``"fp8"`` (float8_e4m3fn, round to nearest, as GPU
float8 training stores it); ``group_size`` None (one scale per row) or 32, 64, 128 columns per
scale; ``scale_dtype`` ``"bfloat16"`` or ``"float32"``.

Integer codes. A group's scale is ``s = absmax / (2^(b-1) - 1)`` over its finite values; a value
``v`` becomes the level ``floor(v / s + u)`` with ``u ~ U[0, 1)``, clamped to
``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and stored offset by ``2^(b-1)`` in ``[1, 2^b - 1]``. Since
``E[floor(t + u)] = t``, ``E[decode(encode(v))] = v``: the weight gradient stays unbiased. The
code 0 marks a non-finite input (inf or NaN): it decodes to NaN, so a non-finite activation makes
the weight gradient non-finite in exactly the columns where the exact one is, and nowhere else. A
group of zeros has ``s = 0`` and decodes to zeros. A bf16 scale is rounded *up* from the float32
one, so no value falls outside the levels. 4- and 2-bit codes are packed two and four to a
uint8, so the bytes really are a half and a quarter of int8's. A width the group (or the packing)
does not divide is padded with zeros to the next multiple; the padding is dropped on decode.

The uniform numbers are counter-based: a 32-bit integer hash of each element's index and two
per-call seeds, computed in the graph, so Inductor fuses them into the quantizing kernel and no
random tensor is ever stored or moved. The seeds are graph inputs derived from the backend's seed,
the group and its call counter (``call_seeds``), so a draw is independent of the data, the same
wherever the partitioner places (or repeats) the encode, and resumed exactly from the backend's
``state_dict()``; they never touch torch's global generator (dropout masks are unchanged).

fp8 uses a per-row (or per-group) scale ``absmax / 448`` and deterministic rounding: biased, kept
as the format GPU users know. Non-finite inputs become NaN there too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F

PROJECT, IDENTITY, RESIDUAL = "project", "identity", "residual"
LAYOUTS = (PROJECT, IDENTITY, RESIDUAL)
FP8 = "fp8"
BITS = (8, 4, 2, FP8)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn

_MASK32 = 0xFFFFFFFF
_SEED_RANGE = 2 ** 31  # seeds stay below 2^31, so a hash product stays below 2^63 (int64)


@dataclasses.dataclass(frozen=True)
class Format:
    """How a saved copy is stored (see the module docstring).

    Args:
        bits: None (the input's dtype), 8, 4, 2 or ``"fp8"``.
        group_size: columns per scale, one of ``GROUP_SIZES``; None: one scale per row.
        scale_dtype: ``"bfloat16"`` or ``"float32"``; the scales count in the bytes.
        layout: one of ``LAYOUTS``.
    """

    bits: int | str | None = None
    group_size: int | None = None
    scale_dtype: str = "bfloat16"
    layout: str = PROJECT

    def __post_init__(self):
        check(self.bits, self.group_size, self.scale_dtype)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout != PROJECT and self.bits is None:
            raise ValueError(f"layout {self.layout!r} needs bits (one of {BITS})")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def spec(self) -> str:
        """The format as the graph carries it: ``""`` unquantized, else ``bits/group/scale``
        (``"4/64/bfloat16"``, ``"fp8/row/float32"``); ``parse`` reads it back."""
        if self.bits is None:
            return ""
        group = "row" if self.group_size is None else str(self.group_size)
        return f"{self.bits}/{group}/{self.scale_dtype}"

    @property
    def name(self) -> str:
        """Short and human: ``int4 g64``, ``int8 row``, ``fp8 row``, ``float`` (unquantized);
        a residual layout is named by the report beside its principal rank."""
        if self.bits is None:
            return "float"
        kind = FP8 if self.bits == FP8 else f"int{self.bits}"
        group = "row" if self.group_size is None else f"g{self.group_size}"
        scale = "" if self.scale_dtype == "bfloat16" else " f32 scale"
        return f"{kind} {group}{scale}"

    def saved_bytes(self, rows: int, width: int, r1: int = 0, dtype_bytes: int = 4) -> int:
        """Bytes the copy of ``rows`` x ``width`` keeps (codes, scales, a residual's 16-bit
        principal part of ``r1`` columns); unquantized: ``rows * width`` of ``dtype_bytes``."""
        if self.bits is None:
            return rows * width * dtype_bytes
        padded, groups = _layout(width, self)
        code_bits = 8 if self.bits == FP8 else int(self.bits)
        scale = SCALE_DTYPES[self.scale_dtype].itemsize
        principal = rows * r1 * 2 if self.layout == RESIDUAL else 0
        return rows * (padded * code_bits // 8 + groups * scale) + principal


def check(bits, group_size, scale_dtype) -> None:
    """ValueError naming what is allowed, for a ``bits``, ``group_size`` or ``scale_dtype``."""
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ValueError(f"bits must be None (the input's dtype), 8, 4, 2 or 'fp8', got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"group_size must be None (one scale per row) or one of {GROUP_SIZES} "
                         f"(columns per scale), got {group_size!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {scale_dtype!r}")


def parse(spec: str) -> Format:
    """The ``Format`` of a ``Format.spec`` string (layout ``project``: the graph passes it apart)."""
    if not spec:
        return Format()
    bits, group, scale = spec.split("/")
    return Format(FP8 if bits == FP8 else int(bits), None if group == "row" else int(group), scale)


def _pack(fmt: Format) -> int:
    """Codes per stored byte: 2 for 4 bits, 4 for 2 bits, else 1."""
    return {4: 2, 2: 4}.get(fmt.bits, 1)


def _layout(width: int, fmt: Format) -> tuple[int, int]:
    """(padded width, scale groups per row) for a copy of ``width`` columns."""
    pack = _pack(fmt)
    if fmt.group_size is None:
        padded = -(-width // pack) * pack
        return padded, 1
    step = math.lcm(fmt.group_size, pack)
    padded = -(-width // step) * step
    return padded, padded // fmt.group_size


# -- the uniform draw ------------------------------------------------------------------------------
def call_seeds(seed: int, key: str, call: int) -> tuple[int, int]:
    """Two 31-bit seeds for the draw of group ``key`` at training call ``call``: a hash of the
    three, so that calls and groups get unrelated streams (and a resumed run the same ones)."""
    digest = hashlib.blake2b(f"{seed}|{key}|{call}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % _SEED_RANGE, (value >> 32) % _SEED_RANGE


def _mix32(h: torch.Tensor) -> torch.Tensor:
    # An avalanche of 32-bit integer hashing (xor-shift-multiply rounds) on int64 holding values
    # below 2^32; the multipliers are below 2^31 so every product fits in int64.
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x5BD1E995) & _MASK32
    return h ^ (h >> 16)


def uniform(shape: tuple[int, int], seeds: torch.Tensor) -> torch.Tensor:
    """``U[0, 1)`` float32 of ``shape`` (rows, cols) from ``seeds`` (2,) int64: element ``i``
    gets ``hash(hash(i ^ s0) + s1)``'s top 24 bits. Element-wise, so Inductor fuses it."""
    rows, cols = shape
    index = torch.arange(rows * cols, device=seeds.device, dtype=torch.int64).view(rows, cols)
    h = _mix32((index ^ seeds[0]) & _MASK32)
    h = _mix32((h + seeds[1]) & _MASK32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _bf16_bits(t: torch.Tensor, up: bool = False) -> torch.Tensor:
    """float32 ``t`` rounded to a bf16 value, still in float32, by clearing the low 16 bits of
    its pattern (``up``: towards +inf, for values >= 0; else to nearest even). Done on the bits
    because Inductor drops a float32 -> bf16 -> float32 round trip inside a fused kernel: the
    forward would then quantize against one value and the backward decode with another."""
    bits = t.view(torch.int32)
    carry = 0xFFFF if up else 0x7FFF + ((bits >> 16) & 1)
    return ((bits + carry) & -0x10000).view(torch.float32)


# -- encode / decode -------------------------------------------------------------------------------
def encode(v: torch.Tensor, seeds: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` (N, w) -> ``(codes, scales)``: codes (N, padded / pack) uint8 (float8_e4m3fn for fp8),
    scales (N, groups) in the format's scale dtype. ``seeds`` (2,) int64 (unused for fp8)."""
    fmt = parse(spec)
    rows, width = v.shape
    padded, groups = _layout(width, fmt)
    v = v.detach().float()
    if padded != width:
        v = F.pad(v, (0, padded - width))
    vg = v.view(rows, groups, padded // groups)
    finite = torch.isfinite(vg)
    absmax = torch.where(finite, vg.abs(), 0.0).amax(-1, keepdim=True)  # (N, groups, 1)
    top = FP8_MAX if fmt.bits == FP8 else float(2 ** (int(fmt.bits) - 1) - 1)
    scale = absmax / top
    if fmt.scale_dtype == "bfloat16":
        # Round up to bf16 on the bits (clear the low 16 bits of the float32 pattern, carrying
        # into the high ones), so the float32 value used here is exactly the bf16 one stored:
        # Inductor drops a float32 -> bf16 -> float32 round trip inside a fused kernel, which
        # would quantize with one scale and decode with another (a bias of up to 2^-8).
        scale_f = _bf16_bits(scale, up=True)  # >= scale: no value is clipped
        scale = scale_f.to(torch.bfloat16)
    else:
        scale_f = scale
    t = vg * torch.where(scale_f > 0, 1.0 / scale_f, 0.0)
    if fmt.bits == FP8:
        t = torch.where(finite, t.clamp(-FP8_MAX, FP8_MAX), float("nan"))  # e4m3fn has no inf
        codes = t.to(torch.float8_e4m3fn).view(rows, padded)
        return codes, scale.view(rows, groups)
    half = 2 ** (int(fmt.bits) - 1)
    u = uniform((rows, padded), seeds).view(rows, groups, padded // groups)
    level = torch.floor(t + u).clamp(-(half - 1), half - 1) + half
    code = torch.where(finite, level, 0.0).to(torch.int32).view(rows, padded)
    pack = _pack(fmt)
    if pack > 1:
        shifts = torch.arange(pack, device=v.device, dtype=torch.int32) * int(fmt.bits)
        code = (code.view(rows, padded // pack, pack) << shifts).sum(-1)
    return code.to(torch.uint8), scale.view(rows, groups)


def decode(codes: torch.Tensor, scales: torch.Tensor, spec: str, width: int) -> torch.Tensor:
    """``(codes, scales)`` -> the copy (N, ``width``) float32; NaN where the input was not finite."""
    fmt = parse(spec)
    rows = codes.shape[0]
    padded, groups = _layout(width, fmt)
    scale = scales.float().view(rows, groups, 1)
    if fmt.bits == FP8:
        values = codes.float().view(rows, groups, padded // groups) * scale
        return values.view(rows, padded)[:, :width]
    code = codes.to(torch.int32)
    pack = _pack(fmt)
    if pack > 1:
        shifts = torch.arange(pack, device=codes.device, dtype=torch.int32) * int(fmt.bits)
        code = ((code.unsqueeze(-1) >> shifts) & (2 ** int(fmt.bits) - 1)).view(rows, padded)
    half = 2 ** (int(fmt.bits) - 1)
    code = code.view(rows, groups, padded // groups)
    values = torch.where(code == 0, float("nan"), (code - half).float() * scale)
    return values.view(rows, padded)[:, :width]


def rounding_variance(scales: torch.Tensor, spec: str, width: int,
                      column_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32: per row, the expected squared rounding error summed over its columns,
    ``sum_j w_j s_j^2 / 6`` (stochastic rounding of a value whose fractional part is uniform has
    variance ``s^2 p (1 - p)``, mean ``s^2 / 6``); ``w_j`` weighs column j (``P P^T``'s norms of
    a projection). Zero for fp8 (deterministic). The running variance estimate's third term."""
    fmt = parse(spec)
    rows = scales.shape[0]
    if fmt.bits == FP8:
        return torch.zeros(rows, dtype=torch.float32, device=scales.device)
    padded, groups = _layout(width, fmt)
    s2 = scales.float().square()  # (N, groups)
    if column_weight is None:
        cols = torch.full((groups,), padded // groups, dtype=torch.float32, device=scales.device)
        cols[-1] -= padded - width  # padding columns carry no error
    else:
        w = F.pad(column_weight.float(), (0, padded - width))
        cols = w.view(groups, padded // groups).sum(-1)
    return (s2 * cols).sum(-1) / 6.0


# -- the three layouts -------------------------------------------------------------------------------
def principal_dtype(dtype: torch.dtype) -> torch.dtype:
    """A residual layout's principal part: 16 bits, the input's own where it is 16-bit."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def compress(x: torch.Tensor, basis: torch.Tensor, seeds: torch.Tensor, r1: int, spec: str,
             layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantized copy of ``x`` (..., n) for a layout other than unquantized ``project``:
    ``(principal, codes, scales)``. ``principal`` is the residual layout's ``x2d @ Q1`` (N, r1)
    in 16 bits; an empty (N, 0) tensor for the other layouts."""
    n = basis.shape[0]
    x2d = x.detach().reshape(-1, n)
    empty = x2d.new_zeros((x2d.shape[0], 0))
    if layout == IDENTITY:
        return (empty, *encode(x2d, seeds, spec))
    with torch.autocast(device_type=x2d.device.type, enabled=False):
        if layout == PROJECT:
            return (empty, *encode(torch.mm(x2d, basis.to(x2d.dtype)), seeds, spec))
        q1 = basis[:, :r1].float()
        xf = x2d.float()
        # the principal part of the finite values only: an inf or NaN stays where it is in the
        # residual (its code marks it), instead of spreading over the whole row through x Q1
        finite = torch.where(torch.isfinite(xf), xf, 0.0)
        principal = torch.mm(finite, q1)  # (N, r1)
        dtype = principal_dtype(x.dtype)
        if dtype == torch.bfloat16:
            principal = _bf16_bits(principal)  # the value kept, exactly (see _bf16_bits)
        else:
            principal = principal.to(dtype).float()
        residual = xf - torch.mm(principal, q1.t())  # (N, n), lives in this kernel only
        principal = principal.to(dtype)
        return (principal, *encode(residual, seeds, spec))


def weight_grad(grad_out_2d: torch.Tensor, principal: torch.Tensor, codes: torch.Tensor,
                     scales: torch.Tensor, basis: torch.Tensor, r1: int, spec: str, layout: str,
                     with_stats: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dW`` (m, n) in the gradient's dtype from the saved copy, and, with ``with_stats``, the running
    estimate's ``[||A1||^2, ||A2||^2, q]`` (``prac_fx.variance.running_estimate``):

    - project: ``A = dY^T c`` (m, r) with ``c`` decoded; ``dW = A P^T``; A1, A2 its columns split
      at r1; q the rounding error carried to dW (column weights 1 on Q1, k on Q2);
    - identity: ``dW = dY^T decode``; A1 = 0, ``||A2||^2 = ||dW||^2 - q``;
    - residual: ``A1 = dY^T (x Q1)~`` (exact up to 16-bit rounding), ``dW_R = dY^T decode(q(R))``,
      ``dW = A1 Q1^T + dW_R``; ``||A2||^2 = ||dW_R||^2 - q``, an estimate of ``||G_perp||^2``.
    """
    n = basis.shape[0]
    g = grad_out_2d  # (N, m), in the gradient's dtype: the products run in it, as Inductor's do
    basis_c = basis.to(g.dtype)
    width = basis.shape[1] if layout == PROJECT else n
    decoded = decode(codes, scales, spec, width).to(g.dtype)  # (N, width)
    g_rows = g.float().square().sum(-1) if with_stats else None  # (N,) ||dY_i||^2
    stats = None
    if layout == PROJECT:
        a = torch.mm(g.t(), decoded)  # (m, r)
        grad_weight = torch.mm(a, basis_c.t())
        if with_stats:
            weight = basis.float().square().sum(0)  # (r,): 1 on Q1's columns, k on Q2's
            q = torch.dot(g_rows, rounding_variance(scales, spec, width, weight))
            a = a.float()
            stats = torch.stack([a[:, :r1].square().sum(), a[:, r1:].square().sum(), q])
        return grad_weight, stats
    grad_rest = torch.mm(g.t(), decoded)  # (m, n): identity's dW, residual's dW_R
    if layout == IDENTITY:
        grad_weight, a1 = grad_rest, None
    else:
        a = torch.mm(g.t(), principal.to(g.dtype))  # (m, r1)
        grad_weight = torch.mm(a, basis_c[:, :r1].t()) + grad_rest
        a1 = a.float().square().sum()
    if with_stats:
        q = torch.dot(g_rows, rounding_variance(scales, spec, width))
        rest = grad_rest.float().square().sum() - q
        stats = torch.stack([torch.zeros_like(rest) if a1 is None else a1, rest, q])
    return grad_weight, stats
