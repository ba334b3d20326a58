"""Stochastic rounding with jax.numpy: the recipe of :mod:`precision.stochastic` (the numpy reference; design in
docs/stochastic_rounding.md) as jnp integer ops on the carrier's bit pattern, bit for bit the same.

Only bit casts and unsigned integer ops touch the values, so XLA's flush of float32 subnormals (docs/numerics.md)
never applies: subnormal inputs and results round as in numpy. A float32 carrier works in uint32 (no x64 needed:
the bf16/fp16/fp8 roundings of a float32 update); a float64 carrier in uint64 (the caller holds float64, so x64 is
on). ``seed``, ``step``, ``tensor`` and ``start_index`` may be traced uint32 scalars (a step counter inside
``lax.scan``); ``fmt`` is static. Everything jits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ...formats import Format, get_format
from ...stochastic import RANDOM_BITS, check_key, sr_params, threefry_rounds

__all__ = ["threefry2x32", "random_bits", "round_stochastic"]

_M32 = 0xFFFFFFFF


def threefry2x32(k0, k1, c0, c1):
    """Threefry-2x32-20 on broadcast uint32 arrays; returns (y0, y1)."""
    k0, k1, c0, c1 = (jnp.asarray(v, dtype=jnp.uint32) for v in (k0, k1, c0, c1))
    return threefry_rounds(jnp, k0, k1, c0, c1)


def random_bits(seed, step, tensor, index):
    """32 random bits of element ``index``: word 0 of threefry2x32_20(key=(seed, tensor), counter=(index, step))."""
    return threefry2x32(seed, tensor, index, step)[0]


def _is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def round_stochastic(x, fmt: Format | str, seed, step, tensor, start_index=0) -> jax.Array:
    """``x`` rounded stochastically to ``fmt``, in ``x``'s carrier (float64 stays float64; float32 and narrower
    dtypes use float32). Same arguments and bits as :func:`precision.stochastic.round_stochastic`."""
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    carrier = np.float64 if x.dtype == jnp.float64 else np.float32
    x = x.astype(carrier)
    if all(_is_concrete(v) for v in (seed, step, tensor)):
        check_key(int(seed), int(step), int(tensor))
    if _is_concrete(start_index) and not 0 <= int(start_index) <= _M32 - max(x.size - 1, 0):
        raise ValueError("element indices do not fit in 32 bits")
    p = sr_params(fmt, carrier)
    if p.identity:
        return x
    width = p.width
    uint = jnp.uint64 if width == 64 else jnp.uint32
    sint = jnp.int64 if width == 64 else jnp.int32

    def U(v):
        return jnp.asarray(v, dtype=uint)

    flat = x.reshape(-1)
    u = jax.lax.bitcast_convert_type(flat, uint)
    a = u & U((1 << (width - 1)) - 1)
    sign = u ^ a
    biased = (a >> U(p.carrier_mantissa)).astype(sint)
    sig = (a & U((1 << p.carrier_mantissa) - 1)) | ((biased != 0).astype(uint) << U(p.carrier_mantissa))
    exponent = jnp.maximum(biased, 1) - p.carrier_bias
    qe = jnp.maximum(exponent, p.emin) - p.mantissa
    if not p.subnormals:
        qe = jnp.where(exponent < p.emin, p.emin, qe)  # below tiny: neighbours 0 and tiny
    shift = qe - (exponent - p.carrier_mantissa)
    sc = jnp.minimum(shift, width - 1).astype(uint)
    kept = sig >> sc
    discarded = sig - (kept << sc)
    right = jnp.clip(shift - RANDOM_BITS, 0, width - 1).astype(uint)
    left = jnp.clip(RANDOM_BITS - shift, 0, RANDOM_BITS).astype(uint)
    top = jnp.where(shift >= RANDOM_BITS, discarded >> right, discarded << left)
    d = (top & U(_M32)).astype(jnp.uint32)
    small = shift <= p.carrier_mantissa
    toward = jnp.where(small, a - discarded, U(0))
    spacing = jnp.where(small, U(1) << jnp.minimum(sc, U(p.carrier_mantissa)),
                        jnp.clip(qe + p.carrier_bias, 0, None).astype(uint) << U(p.carrier_mantissa))
    away = toward + spacing

    index = jnp.arange(flat.shape[0], dtype=jnp.uint32) + jnp.asarray(start_index, dtype=jnp.uint32)
    r = random_bits(seed, step, tensor, index)
    up = (r + d) < d  # the carry out of D + R in 32 bits
    out = jnp.where(up, away, toward)
    out = jnp.where(out > U(p.max_bits), U(p.overflow_bits), out)
    out = jnp.where(a > U(p.inf_bits), U(p.qnan_bits), out)
    out = out | sign
    return jax.lax.bitcast_convert_type(out, carrier).reshape(x.shape)
