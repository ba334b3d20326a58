"""Exact round-to-nearest-even into any format of :mod:`precision.formats`, inside numba-compiled code.

numba's CPU target has no float16 or bfloat16 type (docs/numerics.md), so narrow formats are emulated: their values are
kept in a wider *carrier* (float32 in the update kernels, float64 in the training loops; every fp32 / fp16 / bf16 /
fp8 value is exactly a value of either) and every operation's carrier result is rounded to the format right after
it. For + - * / sqrt of format values that carrier rounding followed by a rounding to the format equals the exactly
rounded result, because the carrier has >= 2p + 2 significand bits (24 >= 2*11 + 2 for fp16 in float32, 53 >=
2*24 + 2 for fp32 in float64: Figueroa's double-rounding theorem). Transcendentals are computed in float64 and
rounded once from float64 (:func:`round64`): no route through float32 can do that without double rounding.

The rounding of a float32 pattern with magnitude bits ``a``, to a format keeping ``k`` of float32's 23 mantissa bits
(``s = 23 - k`` dropped):

- normal range of the format: ``(a + 2^(s-1) - 1 + lsb) & ~(2^s - 1)``, lsb = the lowest kept bit: the sum carries
  into the kept bits exactly when the dropped bits exceed half an ulp, or equal it with an odd lsb (ties to even);
  a carry out of the mantissa bumps the exponent, which is the right result too;
- below the format's smallest normal: ``(|x| + M) - M`` with ``M = 2^(emin - k + 23)``, whose ulp is the format's
  subnormal spacing 2^(emin - k), so the float32 addition itself rounds to that grid, ties to even;
- a rounded magnitude above the format's max becomes inf, or NaN for finite-only formats (fp8 e4m3fn); NaN becomes
  a quiet NaN (NaN payloads and signs carry no value: tests compare NaN as NaN);
- a format without subnormals (``fp(p=P,emax=E,subnormals=no)``) then flushes a rounded magnitude below its tiny
  to zero (sign kept). Its flag is the sign bit of the ``magic`` field (a positive number otherwise), so the
  FormatCode type, and every compiled loop, is the same for every format.

Emulated formats (tf32, ``fp(p=P,emax=E)``, docs/formats.md) are just more parameters of the same recipe; their
transcendentals always compute in float64 and round once (as in the numpy backend). The float64 training carrier
is exact for + - * / sqrt only up to p = 25 (53 >= 2p + 2): :func:`format_code` refuses an emulated format with
more precision, with a SpecError naming it.

Each step is a select, not a branch, and the integer work stays 32 bits wide (an LLVM intrinsic: numba would widen
uint32 arithmetic to 64 bits and halve the SIMD lanes), so loops around these functions vectorize. float64 inputs
use the same recipe on 64-bit patterns (``s = 52 - k``).

Formats reach compiled code in two ways (:func:`rnd` dispatches on the type):

- :func:`format_code`: a :class:`FormatCode` of int64 fields, the same numba type for every format, so a training
  loop compiles once and takes its policy's formats as runtime arguments;
- :func:`static_code`: an instance of a per-format subclass, so a hot kernel compiles a specialization with the
  format's constants folded in: nothing at all for fp32 / fp64 in their own carrier, the CPU's float64 -> float32
  conversion and back for fp32 in a float64 carrier, a 7-instruction bf16 rounding
  (its exponent range is float32's, so float32 subnormals and overflow to inf need no special case; NaN is the one
  select), and the CPU's own float32 -> float16 -> float32 conversions (F16C, round to nearest even, subnormals
  kept) for fp16.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ...errors import SpecError
from ...formats import MAX_EXACT_EMULATED_PRECISION, Format, get_format

__all__ = ["FormatCode", "format_code", "check_emulated", "static_code", "static_format_name", "rnd", "rnd_narrow",
           "store", "like", "round32", "round64",
           "round_array32", "round_array64", "JIT", "TRANSCENDENTALS", "TRANSCENDENTAL_FLOAT32",
           "TRANSCENDENTAL_ROUNDED", "HAS_F16C", "target_has"]

# One set of options for every kernel of this backend: cached on disk; numpy's division semantics (x / 0 gives inf
# or NaN, as in the numpy backend, instead of raising ZeroDivisionError); no fastmath (it would reassociate sums and
# contract a*b + c into FMA, changing results).
JIT = dict(cache=True, error_model="numpy", fastmath=False)



def target_has(feature: str) -> bool:
    """Whether numba's code generator targets ``feature``: the host CPU's, unless NUMBA_CPU_FEATURES overrides
    them (numba then compiles for exactly that feature string; the tests use it to emulate a CPU without F16C)."""
    override = numba.config.CPU_FEATURES
    if override:
        return f"+{feature}" in override.replace(" ", "").split(",")
    return bool(llvm.get_host_cpu_features().get(feature, False))


# float16 <-> float32 conversions in hardware. Without F16C, LLVM would lower them to C runtime calls that numba's
# JIT linker may not find, so they are used only where the target has the instructions.
HAS_F16C = target_has("f16c")

_F32_MANTISSA, _F64_MANTISSA = 23, 52
_F32_QNAN, _F64_QNAN = 0x7FC00000, 0x7FF8000000000000
_F32_INF, _F64_INF = 0x7F800000, 0x7FF0000000000000


class FormatCode(NamedTuple):
    """A format as plain integers for compiled code (float32 and float64 roundings, and transcendental rule).

    A carrier that already holds every value of the format (fp32 in float32, fp64 in float64) gets the identity
    parameters (half 0, lsb 0, full mask, tiny 0), so the same branch-free code leaves its values unchanged.
    """

    half32: int  # 2^(s - 1) - 1: just under half an ulp (s = 23 - k mantissa bits dropped)
    lsb32: int  # 2^s: the lowest kept bit (0 for the identity)
    mask32: int  # clears the dropped bits
    tiny32: int  # float32 pattern of the smallest normal number of the format
    magic32: int  # float32 pattern of 2^(emin - k + 23): its ulp is the format's subnormal spacing; sign bit set:
    # the format has no subnormals (flush results below tiny to zero)
    max32: int  # float32 pattern of the largest finite number
    overflow32: int  # pattern a too-large magnitude rounds to: inf, or NaN for finite-only formats
    half64: int
    lsb64: int
    mask64: int
    tiny64: int
    magic64: int
    max64: int
    overflow64: int
    transcendentals: int  # how exp/tanh/sigmoid are computed: one of the TRANSCENDENTAL_* constants


# Field positions for the compiled code (numba freezes module constants).
_HALF, _LSB, _MASK, _TINY, _MAGIC, _MAX, _OVERFLOW = range(7)
_F64 = 7  # offset of the float64 fields
TRANSCENDENTALS = 14
# The numpy backend's rule (numpy_backend/ops.py): fp64 and fp32 use their own dtype's functions; narrower formats
# compute in float64 and round once.
TRANSCENDENTAL_FLOAT64, TRANSCENDENTAL_FLOAT32, TRANSCENDENTAL_ROUNDED = 0, 1, 2


def _bits32(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.uint32))


def _bits64(value: float) -> int:
    return int(np.array(value, dtype=np.float64).view(np.uint64))


def _fields(fmt: Format) -> list[int]:
    fields = []
    for carrier_mantissa, bits, dtype, inf, qnan in ((_F32_MANTISSA, _bits32, np.float32, _F32_INF, _F32_QNAN),
                                                     (_F64_MANTISSA, _bits64, np.float64, _F64_INF, _F64_QNAN)):
        all_ones = (1 << np.dtype(dtype).itemsize * 8) - 1
        sign_bit = (all_ones >> 1) + 1
        if fmt.emulated and dtype == np.float32 and fmt.dtype == np.float64:
            # A float32 carrier cannot hold this format (its carrier is float64): every nonzero value rounds to
            # NaN there (max 0, overflow NaN), loudly, should a float32 kernel ever be handed it.
            fields += [0, 0, all_ones, 0, 0, 0, qnan]
            continue
        shift = carrier_mantissa - fmt.mantissa_bits
        if shift <= 0 and not fmt.emulated:
            # The carrier holds every value of the format (fp32 in float32, fp64 in float64): identity. (A float32
            # carrier is never asked to hold fp64 values: fp64 quantities live in float64.)
            fields += [0, 0, all_ones, 0, 0, bits(float(np.finfo(dtype).max)), inf]
            continue
        magic = math.ldexp(1.0, fmt.min_exponent - fmt.mantissa_bits + carrier_mantissa)
        # shift 0 (an emulated format with the carrier's precision, e.g. fp(p=24,emax=100) in float32): the normal
        # range needs no rounding (half 0, lsb 0, full mask), the range, subnormals and flush still apply
        fields += [max((1 << shift >> 1) - 1, 0), (1 << shift) if shift else 0, all_ones ^ ((1 << shift) - 1),
                   bits(fmt.tiny), bits(magic) | (0 if fmt.has_subnormals else sign_bit), bits(fmt.max),
                   inf if fmt.has_inf else qnan]
    fp32 = get_format("fp32")
    fields.append(TRANSCENDENTAL_ROUNDED if fmt.emulated else
                  TRANSCENDENTAL_FLOAT64 if fmt.precision > fp32.precision else
                  TRANSCENDENTAL_FLOAT32 if fmt.precision == fp32.precision else TRANSCENDENTAL_ROUNDED)
    # Patterns >= 2^63 do not fit numba's int64 tuple: keep their two's complement (same low 64 bits).
    return [f - (1 << 64) if f >= 1 << 63 else f for f in fields]


def check_emulated(fmt: Format) -> None:
    """SpecError for an emulated format the float64 carrier cannot compute exactly in (p > 25)."""
    if fmt.emulated and fmt.precision > MAX_EXACT_EMULATED_PRECISION:
        raise SpecError(f"format {fmt.name} is refused by the numba backend: its loops compute in a float64 "
                        f"carrier, exact only up to p = {MAX_EXACT_EMULATED_PRECISION} (53 >= 2p + 2); "
                        f"p = {fmt.precision} would round twice")


def format_code(fmt: Format | str) -> FormatCode:
    """The integers that describe ``fmt`` to the kernels, all derived from its exponent and mantissa widths."""
    fmt = get_format(fmt)
    check_emulated(fmt)
    return FormatCode(*_fields(fmt))


# One FormatCode subclass per format: numba types a named tuple by its class, so each is its own compile-time type.
_STATIC_CLASSES = {name: type(f"StaticFormatCode_{name}", (FormatCode,), {"format_name": name})
                   for name in ("fp64", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "tf32")}
# Module attributes, so that pickle finds the classes by name: numba's on-disk cache pickles the argument types of
# every compiled signature, and without this it silently recompiles the static specializations in every process.
globals().update({cls.__name__: cls for cls in _STATIC_CLASSES.values()})
_STATIC_BY_CLASS = {cls: name for name, cls in _STATIC_CLASSES.items()}


def static_format_name(code_type) -> str | None:
    """The format name of a static code's numba type (None for a generic FormatCode or anything else)."""
    return _STATIC_BY_CLASS.get(getattr(code_type, "instance_class", None))


def static_code(fmt: Format | str) -> FormatCode:
    """Like :func:`format_code`, but kernels taking it compile a specialization for this one format."""
    fmt = get_format(fmt)
    if fmt.name not in _STATIC_CLASSES:
        raise SpecError(f"format {fmt.name} has no static (compile-time) code in the numba backend: a custom format "
                        f"compiles with format_code (runtime arguments); static codes: {', '.join(_STATIC_CLASSES)}")
    return _STATIC_CLASSES[fmt.name](*_fields(fmt))


def _rounding_codegen(width: int):
    """LLVM IR of the rounding on ``width``-bit patterns, integer ops in that width."""
    fp = ir.FloatType() if width == 32 else ir.DoubleType()
    it = ir.IntType(width)
    sign_bit, inf, qnan = (1 << 31, _F32_INF, _F32_QNAN) if width == 32 else (1 << 63, _F64_INF, _F64_QNAN)

    def codegen(context, builder, signature, args):
        x, half, lsb, mask, tiny, magic, max_bits, overflow = args
        u = builder.bitcast(x, it)
        sign = builder.and_(u, ir.Constant(it, sign_bit))
        a = builder.xor(u, sign)
        odd = builder.zext(builder.icmp_unsigned("!=", builder.and_(a, lsb), ir.Constant(it, 0)), it)
        normal = builder.and_(builder.add(builder.add(a, half), odd), mask)
        flush = builder.lshr(magic, ir.Constant(it, width - 1))  # 1: no subnormals
        magic_f = builder.bitcast(builder.and_(magic, ir.Constant(it, sign_bit - 1)), fp)
        subnormal = builder.bitcast(builder.fsub(builder.fadd(builder.bitcast(a, fp), magic_f), magic_f), it)
        r = builder.select(builder.icmp_unsigned("<", a, tiny), subnormal, normal)
        r = builder.select(builder.icmp_unsigned(">", r, max_bits), overflow, r)
        # below tiny after rounding: zero when the format has no subnormals (threshold 0 otherwise: no-op)
        threshold = builder.and_(tiny, builder.sub(ir.Constant(it, 0), flush))
        r = builder.select(builder.icmp_unsigned("<", r, threshold), ir.Constant(it, 0), r)
        r = builder.select(builder.icmp_unsigned(">", a, ir.Constant(it, inf)), ir.Constant(it, qnan), r)
        return builder.bitcast(builder.or_(r, sign), fp)
    return codegen


@intrinsic
def _round32_bits(typingctx, x, half, lsb, mask, tiny, magic, max_bits, overflow):
    return types.float32(types.float32, *[types.uint32] * 7), _rounding_codegen(32)


@intrinsic
def _round64_bits(typingctx, x, half, lsb, mask, tiny, magic, max_bits, overflow):
    return types.float64(types.float64, *[types.uint64] * 7), _rounding_codegen(64)


@intrinsic
def _round_bf16_bits(typingctx, x):
    """bf16 in float32 (docs/numerics.md): (u + 0x7FFF + lsb) & 0xFFFF0000 on the signed pattern; NaN -> quiet NaN.

    bf16 has float32's exponent range, so float32 subnormals round on the same pattern arithmetic and a carry out
    of the largest finite numbers lands exactly on inf: no other special case."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        r = builder.and_(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb), ir.Constant(i32, 0xFFFF0000))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        r = builder.select(is_nan, ir.Constant(i32, _F32_QNAN), r)
        return builder.bitcast(r, ir.FloatType())
    return types.float32(types.float32), codegen


@intrinsic
def _round_fp16_f16c(typingctx, x):
    """fp16 in float32 through the F16C conversions (vcvtps2ph / vcvtph2ps; round to nearest even)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.float32), codegen


@numba.njit(**JIT)
def round32(x, code):
    """float32 ``x`` rounded to the nearest value of ``code``'s format (ties to even), as float32."""
    return _round32_bits(np.float32(x), np.uint32(code[_HALF]), np.uint32(code[_LSB]), np.uint32(code[_MASK]),
                         np.uint32(code[_TINY]), np.uint32(code[_MAGIC]), np.uint32(code[_MAX]),
                         np.uint32(code[_OVERFLOW]))


@numba.njit(**JIT)
def round64(x, code):
    """float64 ``x`` rounded once to the nearest value of ``code``'s format (ties to even), as float64."""
    return _round64_bits(np.float64(x), np.uint64(code[_F64 + _HALF]), np.uint64(code[_F64 + _LSB]),
                         np.uint64(code[_F64 + _MASK]), np.uint64(code[_F64 + _TINY]),
                         np.uint64(code[_F64 + _MAGIC]), np.uint64(code[_F64 + _MAX]),
                         np.uint64(code[_F64 + _OVERFLOW]))


def _is64(x) -> bool:
    return isinstance(x, types.Float) and x.bitwidth == 64


def rnd(x, code):
    """``x`` (a float32 or float64 carrier value) rounded to ``code``'s format, in the same carrier."""
    raise NotImplementedError("rnd is only callable from numba-compiled code")


# IR-level inlining: rnd is called once per operation inside hot loops, and LLVM alone does not inline a function
# made of many of them (the loop would then not vectorize).
@overload(rnd, jit_options=JIT)
def _rnd(x, code):
    name = static_format_name(code)
    if _is64(x):
        if name == "fp64":
            def exact64(x, code):
                return x
            return exact64
        if name == "fp32":
            # The CPU's float64 -> float32 conversion: round to nearest even, float32 subnormals kept (no FTZ in
            # numba's code), overflow to inf, NaN stays NaN: exactly round_to(x, fp32), in two instructions.
            def fp32_in64(x, code):
                return np.float64(np.float32(x))
            return fp32_in64

        def impl64(x, code):
            return round64(x, code)
        return impl64
    if name in ("fp32", "fp64"):
        def exact32(x, code):
            return np.float32(x)
        return exact32
    if name == "bf16":
        def bf16(x, code):
            return _round_bf16_bits(np.float32(x))
        return bf16
    if name == "fp16" and HAS_F16C:
        def fp16(x, code):
            return _round_fp16_f16c(np.float32(x))
        return fp16
    if name is not None:  # other static formats: the generic rounding with its constants folded in
        half, lsb, mask, tiny, magic, max_bits, overflow = (np.uint32(f & 0xFFFFFFFF) for f in _fields(
            get_format(name))[:_F64])

        def folded(x, code):
            return _round32_bits(np.float32(x), half, lsb, mask, tiny, magic, max_bits, overflow)
        return folded

    def impl32(x, code):
        return round32(x, code)
    return impl32


def like(x, array):
    """``x`` converted to the element type of ``array`` (float32 or float64): the carrier a loop computes in."""
    raise NotImplementedError("like is only callable from numba-compiled code")


@overload(like, inline="always", jit_options=JIT)
def _like(x, array):
    if array.dtype == types.float32:
        def to32(x, array):
            return np.float32(x)
        return to32

    def to64(x, array):
        return np.float64(x)
    return to64


def rnd_narrow(x, code):
    """``x`` rounded to ``code``'s format in the narrowest carrier that computes that format's operations exactly:
    float32 for the static fp32 code (the conversion is the rounding; every + - * / sqrt of two float32 values is
    then the correctly rounded fp32 result, the same bits as the float64 operation rounded to fp32), else
    :func:`rnd` in x's own carrier. The update loops start from it, so the pure fp32 policy's update runs on
    8-lane float32 vectors, float32 division and square root included."""
    raise NotImplementedError("rnd_narrow is only callable from numba-compiled code")


@overload(rnd_narrow, inline="always", jit_options=JIT)
def _rnd_narrow(x, code):
    if static_format_name(code) == "fp32":
        def to32(x, code):
            return np.float32(x)
        return to32

    def same_carrier(x, code):
        return rnd(x, code)
    return same_carrier


def store(x, storage, work):
    """``x`` (a value of the ``work`` format) stored in ``storage`` and read back into ``work``: the numpy backend's
    ``convert(convert(x, U, S), S, U)``. Two roundings, skipped at compile time when both are the same static
    format (then ``x`` is already stored exactly)."""
    raise NotImplementedError("store is only callable from numba-compiled code")


@overload(store, jit_options=JIT)
def _store(x, storage, work):
    name = static_format_name(storage)
    if name is not None and name == static_format_name(work):
        def same(x, storage, work):
            return x
        return same

    def impl(x, storage, work):
        return rnd(rnd(x, storage), work)
    return impl


@numba.njit(**JIT)
def round_array32(x, code, out):
    """out[i] = rnd(x[i], code) for float32 arrays (the tests' entry point; generic or static code)."""
    for i in range(x.size):
        out[i] = rnd(x[i], code)


@numba.njit(**JIT)
def round_array64(x, code, out):
    """out[i] = rnd(x[i], code) for float64 arrays."""
    for i in range(x.size):
        out[i] = rnd(x[i], code)
