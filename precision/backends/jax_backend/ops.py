"""Arithmetic in one format with jax.numpy: typed scalars, dots and sums through the accumulator, transcendentals,
and exact conversions between formats.

The policy is expressed natively: arrays carry the policy's dtypes, dot products ask XLA for the accumulator
dtype through ``preferred_element_type`` (exact products, one rounding to the compute format afterwards), and
XLA rounds fp16/bf16/fp8 elementwise ops after every op by itself (docs/numerics.md), so elementwise code is plain jnp.

Two places where plain jnp would not give the reference's (numpy backend's) semantics:

* Transcendentals below fp32. The reference computes exp/tanh/sigmoid in float64 and rounds once (numpy's own
  float16 exp is CPU dependent). XLA has no float64 without x64 and would compute them in float32 (a few ulp off)
  and round again. A format of at most 16 bits has at most 65,536 inputs, so the correctly rounded result of every
  input is tabulated once on the host by the reference's own code and looked up by bit pattern: exact, the same
  on CPU and GPU, and a cheap gather.
* Narrowing from float64 to bf16/fp8. XLA converts f64 -> bf16 through f32 and so rounds twice (500,448 of 1e6
  midpoint traps differ from one correct rounding). :func:`convert` rounds in float64 to the target precision
  first (exact with frexp/ldexp/rint), after which the cast is exact.

Emulated formats (tf32, ``fp(p=P,emax=E)``: no XLA dtype, docs/formats.md). :func:`convert` into or out of one is
exact: into a float32-carried format by integer operations on the float32 bit pattern (:func:`round_in_float32`:
no float arithmetic, so XLA's flush of float32 subnormals does not touch it), into a float64-carried one by
:func:`round_in_float64` (x64 only). So such a format works as a *storage* format (params, state, master) when the
update format is native. Elementwise arithmetic in one is another matter: the shared training code
(``array_math``) is plain jnp, which XLA would compute in the carrier without rounding to the format, so
:class:`JaxOps` refuses an emulated compute format and :func:`check_policy` an emulated compute or update format,
each with one SpecError naming the format, the backend and why.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import SpecError
from ...formats import Format, get_format
from ...formats import to_format as _host_to_format
from ..numpy_backend.ops import FormatOps as _ReferenceOps

__all__ = ["JaxOps", "convert", "round_in_float64", "round_in_float32", "round_to_format", "check_policy",
           "refusal", "transcendental_table", "MATMUL_PRECISION"]

_FP32 = get_format("fp32")
_FP64 = get_format("fp64")
_UINT = {8: jnp.uint8, 16: jnp.uint16}

# Full-precision products for float32 dots: on GPUs XLA's default f32 matmul may use TF32 (10-bit mantissa inputs),
# which would be a different policy from "a=fp32, exact products". HIGHEST keeps CPU and GPU on the same contract.
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def round_in_float64(x: jax.Array, fmt: Format) -> jax.Array:
    """Round float64 values to ``fmt``'s grid, ties to even, result still float64 (the jnp twin of
    :func:`precision.formats.round_to`). The subsequent cast to ``fmt`` is exact. Overflow: inf, or NaN for
    finite-only formats. Needs x64 (the caller holds float64 arrays)."""
    _, e = jnp.frexp(x)
    exponent = jnp.maximum(e - 1, fmt.min_exponent)  # subnormals share emin's quantum
    quantum_exp = exponent - fmt.mantissa_bits
    out = jnp.ldexp(jnp.rint(jnp.ldexp(x, -quantum_exp)), quantum_exp)
    out = jnp.copysign(out, x)
    overflow_value = jnp.copysign(jnp.inf, x) if fmt.has_inf else jnp.nan
    out = jnp.where(jnp.abs(out) > fmt.max, overflow_value, out)
    if not fmt.has_subnormals:
        out = jnp.where(jnp.abs(out) < fmt.tiny, jnp.copysign(0.0, x), out)
    return out


def _u32(value: int) -> jax.Array:
    return jnp.asarray(value, dtype=jnp.uint32)


def round_in_float32(x: jax.Array, fmt: Format) -> jax.Array:
    """float32 values rounded to ``fmt`` (an emulated format whose carrier is float32), ties to even, as float32:
    :func:`precision.formats.round_to` on the bit pattern, integer operations only (exact on any device, and
    untouched by a flush of float32 subnormals). Overflow gives inf; NaN a quiet NaN; the sign of zero is kept;
    without subnormals a result below tiny is a zero of the input's sign.

    The significand ``sig`` (implicit bit included) of |x| = sig * 2^(e - 23) is rounded at ``d`` bits, the
    format's quantum there: d = (23 - m) + max(0, emin - e), clamped to 25 (anything beyond rounds to 0 anyway);
    the result r * 2^(e - 23) is re-encoded (normalized with a count of leading zeros, or a float32 subnormal)."""
    m, emin = fmt.mantissa_bits, fmt.min_exponent
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = u & _u32(0x80000000)
    a = u ^ sign
    biased = (a >> _u32(23)).astype(jnp.int32)
    frac = a & _u32(0x7FFFFF)
    sig = jnp.where(biased > 0, frac | _u32(0x800000), frac)
    e = jnp.maximum(biased, 1) - 127
    d = jnp.minimum((23 - m) + jnp.maximum(emin - e, 0), 25).astype(jnp.uint32)
    half = (_u32(1) << d) >> _u32(1)
    lsb = (sig >> d) & _u32(1)
    rounded = jnp.where(d == 0, sig, ((sig + half + lsb - jnp.minimum(half, _u32(1))) >> d) << d)
    # re-encode rounded * 2^(e - 23): normal when its exponent is >= -126, else a float32 subnormal
    length = 32 - jax.lax.clz(rounded).astype(jnp.int32)  # bit length, 1..25 (0 for zero)
    ex = e - 24 + length
    mant = jnp.where(length <= 24, rounded << jnp.maximum(24 - length, 0).astype(jnp.uint32),
                     rounded >> jnp.maximum(length - 24, 0).astype(jnp.uint32)) & _u32(0x7FFFFF)
    normal = (jnp.clip(ex + 127, 0, 255).astype(jnp.uint32) << _u32(23)) | mant
    subnormal = rounded << jnp.clip(e + 126, 0, 31).astype(jnp.uint32)
    r = jnp.where(rounded == 0, _u32(0), jnp.where(ex >= -126, normal, subnormal))
    r = jnp.where(r > _u32(_bits32(fmt.max)), _u32(0x7F800000), r)  # (ex + 127 >= 255 lands here too)
    if not fmt.has_subnormals:
        r = jnp.where(r < _u32(_bits32(fmt.tiny)), _u32(0), r)
    r = jnp.where(a > _u32(0x7F800000), _u32(0x7FC00000), r)
    return jax.lax.bitcast_convert_type(r | sign, jnp.float32)


def _bits32(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.uint32))


def round_to_format(x: jax.Array, fmt: Format) -> jax.Array:
    """``x`` (any float dtype) rounded once to the emulated format ``fmt``, in its carrier dtype."""
    if np.dtype(fmt.dtype) == np.float64:
        if not jax.config.jax_enable_x64:
            raise SpecError(f"format {fmt.name} is refused by the jax backend here: its carrier is float64, which "
                            f"JAX holds only with x64 enabled, and this run traces without it")
        return round_in_float64(x.astype(jnp.float64), fmt)
    if x.dtype == jnp.float64:
        y = round_in_float64(x, fmt)  # on the format's grid: the cast to float32 is exact, except that XLA's CPU
        # conversion flushes float32 subnormals; those are built from their pattern (|y| / 2^-149, an integer)
        small = jnp.abs(y) < 2.0**-126
        pattern = (jnp.where(small, jnp.abs(y), 0.0) * 2.0**149).astype(jnp.uint32) | jnp.where(
            jnp.signbit(y), _u32(0x80000000), _u32(0))
        return jnp.where(small, jax.lax.bitcast_convert_type(pattern, jnp.float32), y.astype(jnp.float32))
    return round_in_float32(x, fmt)


def refusal(pol) -> str | None:
    """Why the jax backend cannot run policy ``pol`` exactly, or None: an emulated compute or update format (plain
    jnp arithmetic in ``array_math`` would compute in the carrier without rounding to it)."""
    for role, fmt in (("compute", pol.compute), ("update", pol.update)):
        if fmt.emulated:
            return (f"format {fmt.name} is refused as the {role} format by the jax backend: XLA has no {fmt.name} "
                    f"dtype and the shared jnp training code would compute in its {np.dtype(fmt.dtype).name} "
                    f"carrier without rounding after every op; use it for storage (p, s, m) with a native "
                    f"update format, or the numpy / numba backends, which emulate it exactly")
    return None


def check_policy(pol) -> None:
    """SpecError with :func:`refusal`'s line when the jax backend cannot run ``pol`` exactly."""
    reason = refusal(pol)
    if reason:
        raise SpecError(reason)


def convert(x: jax.Array, src: Format, dst: Format) -> jax.Array:
    """``x`` (held in ``src``'s dtype) in ``dst``'s dtype, rounded once when narrowing."""
    if src == dst:
        return x
    if dst.emulated:
        return round_to_format(x, dst)
    if src.emulated and src.dtype == np.float64 and dst.precision < _FP32.precision:
        x = round_in_float64(x, dst)  # as from fp64: one rounding, not two through f32
    if src.name == "fp64" and dst.precision < _FP32.precision:
        x = round_in_float64(x, dst)  # XLA's f64 -> bf16/fp8 cast goes through f32: round once here instead
    return x.astype(dst.dtype)  # widening is exact; f32 -> narrow (and f64 -> f32) is one correct rounding


@functools.lru_cache(maxsize=None)
def transcendental_table(name: str, fmt: Format) -> np.ndarray:
    """Result of the reference's ``exp``/``tanh``/``sigmoid`` for every bit pattern of a <= 16-bit format, in
    ``fmt``'s dtype, indexed by the input's bit pattern. Built by the numpy backend's own FormatOps, so the values
    are the reference's by construction."""
    patterns = np.arange(2**fmt.bits, dtype=np.uint64).astype(np.dtype(f"u{fmt.bits // 8}"))
    inputs = patterns.view(fmt.dtype)
    with np.errstate(all="ignore"):  # NaN patterns and exp overflow are valid table entries
        out = getattr(_ReferenceOps(fmt, _FP32), name)(inputs)
    out = np.asarray(out)
    if out.dtype != fmt.dtype:  # defensive: the reference rounds to fmt already
        out = _host_to_format(out.astype(np.float64), fmt)
    return out


class JaxOps:
    """Ops whose results live in ``fmt``, with dot products and sums accumulated in ``accum``."""

    def __init__(self, fmt: Format, accum: Format):
        if fmt.emulated:
            raise SpecError(refusal(_Compute(fmt)))
        self.fmt, self.accum = fmt, accum
        self.dtype = jnp.dtype(fmt.dtype)
        self.accum_dtype = jnp.dtype(accum.dtype)
        self._tabulated = fmt.precision < _FP32.precision

    def relu(self, A):
        """max(A, 0): exact in every format (NaN stays NaN, -0 gives +0), as the numpy backend's."""
        return jnp.maximum(A, jnp.zeros((), dtype=A.dtype))

    def scalar(self, value: float) -> jax.Array:
        """A typed 0-d array of this format: one correct rounding from float64 on the host."""
        return jnp.asarray(_host_to_format(np.float64(value), self.fmt))

    def matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """Exact products, sums in the accumulator (XLA's order), one rounding to this format."""
        out = jnp.matmul(a, b, preferred_element_type=self.accum_dtype, precision=MATMUL_PRECISION)
        return convert(out, self.accum, self.fmt)

    def matmul_tn(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``a.T @ b`` as one dot contracting the leading axes: writing ``a.T`` inside the scanned step would make
        XLA transpose (copy) ``a`` at every step, 7x the cost of the logistic-regression step itself."""
        return self._dot(a, b, (0,), (0,))

    def matmul_nt(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``a @ b.T`` as one dot contracting the trailing axes (no transpose copy)."""
        return self._dot(a, b, (a.ndim - 1,), (b.ndim - 1,))

    def _dot(self, a, b, contract_a, contract_b):
        out = jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())), precision=MATMUL_PRECISION,
                                  preferred_element_type=self.accum_dtype)
        return convert(out, self.accum, self.fmt)

    def sum(self, x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
        return convert(jnp.sum(x, axis=axis, dtype=self.accum_dtype, keepdims=keepdims), self.accum, self.fmt)

    def _transcendental(self, name: str, native, x: jax.Array) -> jax.Array:
        if not self._tabulated:
            return native(x)
        table = jnp.asarray(transcendental_table(name, self.fmt))
        index = jax.lax.bitcast_convert_type(x, _UINT[self.fmt.bits]).astype(jnp.int32)
        return jnp.take(table, index, mode="clip")  # every index is in range: 2^bits entries

    def exp(self, x):
        return self._transcendental("exp", jnp.exp, x)

    def tanh(self, x):
        return self._transcendental("tanh", jnp.tanh, x)

    def sigmoid(self, x):
        one = jnp.asarray(1, self.dtype)
        # Written out (not jax.nn.sigmoid, which lowers to XLA's logistic op) so fp32/fp64 round the same three
        # ops as the reference: neg, exp, add, divide.
        return self._transcendental("sigmoid", lambda z: one / (one + jnp.exp(-z)), x)


class _Compute:
    """A policy-like stand-in for :func:`refusal` when only the compute format is known (JaxOps)."""

    def __init__(self, fmt: Format):
        self.compute = self.update = fmt
