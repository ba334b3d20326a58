"""The register-tiled inner kernel of :func:`.linalg.matmul`: a ROWS x (2 vectors) block of outputs whose sums stay
in vector registers for the whole k loop, written as LLVM IR.

Written in numba, such a tile stays in memory or stays scalar: a scratch row of sums is loaded and stored once per
pass over k (the previous four-row kernel, about 9 GMAC/s on the MLP's products), and a tile of scalar locals is
not packed into vectors by LLVM's SLP vectorizer (tried: 13x slower). Here the eight sums are SSA vector values
(``phi`` nodes of the k loop), so each k costs two vector loads of B, four broadcasts of A and 8 multiplies and 8
adds, and nothing is stored until k ends: the layout of BLAS's micro-kernels.

What each output gets is exactly :func:`.linalg.matmul`'s contract: starting from +0, ``s = s + a[i, k] * b[k, j]``
for k = 0, 1, ... in order, every product rounded to the accumulator's type and then added (``fmul`` then
``fadd``, with no fast-math flags: LLVM neither contracts them into an FMA nor reorders them). Lanes are distinct
outputs, never parts of one sum, so vector width changes which sums run side by side and nothing in any sum.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["ROWS", "TILE_ELEMENTS", "tile", "fused_tile", "tile_columns"]

ROWS = 4  # rows of A per tile: 4 x 2 vector sums = 8 registers, with 2 of B and 1 broadcast (16 on AVX2)
TILE_ELEMENTS = 64  # ROWS x tile_columns for float32 (2 x 8 lanes); float64 uses half (2 x 4 lanes)


def _lanes(dtype) -> int:
    """Lanes of one 256-bit vector: 8 float32, 4 float64 (AVX2's width; LLVM splits or widens as the CPU has)."""
    return 32 // np.dtype(str(dtype)).itemsize


def tile_columns(A):
    """Output columns of one tile for operands of A's dtype: 16 (float32) or 8 (float64)."""
    raise NotImplementedError("tile_columns is only callable from numba-compiled code")


@overload(tile_columns, inline="always")
def _tile_columns(A):
    columns = 2 * _lanes(A.dtype)
    return lambda A: columns


def _tile_typer(fused: bool):
    """The typing function of :func:`tile` (``fused`` False) or :func:`fused_tile` (True)."""
    def typer(typingctx, A, a0, lda, ak, B, b0, ldb, depth, out, o0, ldo):
        arrays = (A, B, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None
        if not (A.dtype == B.dtype and A.dtype in (types.float32, types.float64)):
            return None
        if out.dtype not in (A.dtype, types.float64):
            return None
        sig = types.void(A, types.intp, types.intp, types.intp, B, types.intp, types.intp, types.intp, out,
                         types.intp, types.intp)
        return sig, _tile_codegen(_lanes(A.dtype), fused)
    return typer


def _tile_codegen(lanes: int, fused: bool):
    def codegen(context, builder, signature, args):
        a_arr, a0_v, lda_v, ak_v, b_arr, b0_v, ldb_v, depth_v, out_arr, o0_v, ldo_v = args
        a_ptr = context.make_array(signature.args[0])(context, builder, a_arr).data
        b_ptr = context.make_array(signature.args[4])(context, builder, b_arr).data
        o_ptr = context.make_array(signature.args[8])(context, builder, out_arr).data
        scalar = context.get_value_type(signature.args[0].dtype)
        vec = ir.VectorType(scalar, lanes)
        out_vec = ir.VectorType(context.get_value_type(signature.args[8].dtype), lanes)
        intp = context.get_value_type(types.intp)
        i32 = ir.IntType(32)
        itemsize = np.dtype(str(signature.args[0].dtype)).itemsize
        out_itemsize = np.dtype(str(signature.args[8].dtype)).itemsize
        splat_mask = ir.Constant(ir.VectorType(i32, lanes), None)  # all lanes take element 0

        def vector_at(ptr, index, vector_type):
            return builder.bitcast(builder.gep(ptr, [index]), vector_type.as_pointer())

        fma = None
        if fused:
            name = f"llvm.fma.v{lanes}{'f32' if itemsize == 4 else 'f64'}"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)

        def multiply_add(s, a, b):
            # fused: one rounding (llvm.fma), for the figures' price of the no-FMA rule; else two, never contracted
            return builder.call(fma, [a, b, s]) if fused else builder.fadd(s, builder.fmul(a, b))

        entry = builder.basic_block
        header = builder.append_basic_block("tile.k")
        body = builder.append_basic_block("tile.body")
        done = builder.append_basic_block("tile.done")
        builder.branch(header)

        builder.position_at_end(header)  # the k loop: the sums are phi nodes, i.e. registers
        k = builder.phi(intp, "k")
        k.add_incoming(ir.Constant(intp, 0), entry)
        sums = [builder.phi(vec, f"s{n}") for n in range(2 * ROWS)]
        for s in sums:
            s.add_incoming(ir.Constant(vec, None), entry)  # +0
        builder.cbranch(builder.icmp_signed("<", k, depth_v), body, done)

        builder.position_at_end(body)
        row_b = builder.add(b0_v, builder.mul(k, ldb_v))
        b_lo = builder.load(vector_at(b_ptr, row_b, vec), align=itemsize)  # unaligned: any column offset
        b_hi = builder.load(vector_at(b_ptr, builder.add(row_b, ir.Constant(intp, lanes)), vec), align=itemsize)
        new = []
        for r in range(ROWS):
            index = builder.add(builder.add(a0_v, builder.mul(ir.Constant(intp, r), lda_v)), builder.mul(k, ak_v))
            a = builder.load(builder.gep(a_ptr, [index]))
            a_vec = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), a,
                                                                  ir.Constant(i32, 0)),
                                           ir.Constant(vec, ir.Undefined), splat_mask)
            new.append(multiply_add(sums[2 * r], a_vec, b_lo))
            new.append(multiply_add(sums[2 * r + 1], a_vec, b_hi))
        for s, value in zip(sums, new):
            s.add_incoming(value, builder.basic_block)
        k.add_incoming(builder.add(k, ir.Constant(intp, 1)), builder.basic_block)
        builder.branch(header)

        builder.position_at_end(done)
        for n, s in enumerate(sums):
            r, half = divmod(n, 2)
            index = builder.add(builder.add(o0_v, builder.mul(ir.Constant(intp, r), ldo_v)),
                                ir.Constant(intp, half * lanes))
            value = s if out_vec == vec else builder.fpext(s, out_vec)  # float32 -> float64: exact
            builder.store(value, vector_at(o_ptr, index, out_vec), align=out_itemsize)
        return context.get_dummy_value()
    return codegen


tile = intrinsic(_tile_typer(fused=False))
tile.__doc__ = """``tile(A, a0, lda, ak, B, b0, ldb, depth, out, o0, ldo)``:
``out.flat[o0 + r * ldo + c] = sum_k A.flat[a0 + r * lda + k * ak] * B.flat[b0 + k * ldb + c]`` for r < ROWS, c < C =
2 x lanes, k ascending from 0 to ``depth``, from +0, each product rounded and then added (module docstring). A and
B: C-contiguous arrays of one dtype (float32 or float64), A read by element strides (lda, ak): (columns, 1) for A
itself, (1, rows) for the transpose of a C-contiguous array; out: a C-contiguous array of that dtype (scratch) or
of float64 (each sum converted exactly, float32 -> float64). The caller keeps every index in bounds (all C columns
of B are read and all C columns of out written)."""

# The same tile with each multiply-add fused into one FMA (one rounding): NOT the backend's arithmetic. Only
# benchmarks/numba_figures.py uses it, to price the no-FMA rule on the same loop structure.
fused_tile = intrinsic(_tile_typer(fused=True))
