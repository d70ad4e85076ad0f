"""LLVM vector IR for the quantized loops (`_qkernels_jit.py`, `_qsums_jit.py`):
loads and stores of 16 lanes, the unpacking of one field of 16 words, float16 scales
and biases as float32, pointers to rows, and a switch that gives each format of
quantize.py its own code.

The inner loops are LLVM vector IR (numba intrinsics), not plain numba loops: LLVM's
auto-vectorizer widened numba's uint32 arithmetic to 64-bit lanes, scattered the
per-word scales with vscatter, or stayed scalar, depending on the group size (one
thread, rows in cache, q8 with groups of 64: 1.46 ms per 4096 x 4096 against 0.33
ms written as below). Blocks of 16 words load with plain loads; only a row's last,
partial block uses masked loads and stores (a row may end where its buffer ends;
masked loads on every block ran 4-6x slower from memory here).

numba's on-disk cache checks only the file of each compiled kernel, not this one:
after editing it, delete the cached kernels (fallback_numpy/__pycache__/*.nbi and
*.nbc) so that they compile again.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils

from fallback_numpy._kernels_jit import HARDWARE_FLOAT16
from mlx_flashinfer.formats.quantize import BITS, GROUP_SIZES

BLOCK = 16  # words per vector block
FORMATS = [(bits, size * bits // 32) for bits in BITS for size in GROUP_SIZES]
F32 = ir.FloatType()
I64 = ir.IntType(64)
I32 = ir.IntType(32)
FLAGS = ("reassoc", "contract")  # as _kernels_jit._FAST: any order, fused FMA


def vector_of(element, count: int = BLOCK) -> ir.VectorType:
    return ir.VectorType(element, count)


def constant_vector(element, values) -> ir.Constant:
    return ir.Constant(vector_of(element, len(values)), list(values))


def splat(builder, value, count: int = BLOCK):
    """A vector of `count` copies of a scalar (or of lane 0 of a vector)."""
    if not isinstance(value.type, ir.VectorType):
        undef = ir.Constant(vector_of(value.type, 1), ir.Undefined)
        value = builder.insert_element(undef, value, I32(0))
    return shuffle(builder, value, [0] * count)


def shuffle(builder, vector, lanes):
    """The vector of vector[lanes[i]]."""
    return builder.shuffle_vector(
        vector, ir.Constant(vector.type, ir.Undefined), constant_vector(I32, lanes)
    )


def _masked(builder, what: str, vector_type, arguments):
    """A call of LLVM's llvm.masked.load (arguments: pointer, alignment, mask,
    values of the masked lanes) or llvm.masked.store (value, pointer, alignment,
    mask)."""
    element = vector_type.element
    suffix = "f32" if element == F32 else f"i{element.width}"
    name = f"llvm.masked.{what}.v{vector_type.count}{suffix}.p0"
    mask = ir.VectorType(ir.IntType(1), vector_type.count)
    if what == "load":
        pointer = arguments[0]
        fnty = ir.FunctionType(vector_type, [pointer.type, I32, mask, vector_type])
    else:
        pointer = arguments[1]
        fnty = ir.FunctionType(ir.VoidType(), [vector_type, pointer.type, I32, mask])
    function = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(function, arguments)


def load(builder, base, index, count: int, mask=None):
    """`count` elements from base[index] as a vector; lanes outside `mask` (an i1
    vector, None: all) are not read and come back 0."""
    vector_type = vector_of(base.type.pointee, count)
    pointer = builder.bitcast(builder.gep(base, [index]), vector_type.as_pointer())
    if mask is None:
        return builder.load(pointer, align=1)
    zero = ir.Constant(vector_type, None)
    return _masked(builder, "load", vector_type, [pointer, I32(1), mask, zero])


def store(builder, value, base, index, mask=None):
    pointer = builder.bitcast(builder.gep(base, [index]), value.type.as_pointer())
    if mask is None:
        builder.store(value, pointer, align=1)
    else:
        _masked(builder, "store", value.type, [value, pointer, I32(1), mask])


def prefetch(builder, base, index) -> None:
    """Ask for the cache line of base[index] ahead of use (a hint: never faults)."""
    pointer = builder.bitcast(builder.gep(base, [index]), ir.IntType(8).as_pointer())
    fnty = ir.FunctionType(ir.VoidType(), [pointer.type, I32, I32, I32])
    function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(function, [pointer, I32(0), I32(3), I32(1)])  # read, keep, data


def floats_from_halves(builder, halves, hardware: bool = HARDWARE_FLOAT16):
    """float16 bit patterns (an i16 vector) as float32: LLVM's half -> float where
    the CPU has an instruction for it, else from the bits as
    `_kernels_jit._float32_from_float16_bits` does (exact for every pattern)."""
    count = halves.type.count
    if hardware:
        as_half = builder.bitcast(halves, vector_of(ir.HalfType(), count))
        return builder.fpext(as_half, vector_of(F32, count))
    bits = builder.zext(halves, vector_of(I32, count))

    def constant(value):
        return constant_vector(I32, [value] * count)

    magnitude = builder.shl(builder.and_(bits, constant(0x7FFF)), constant(13))
    value = builder.fmul(
        builder.bitcast(magnitude, vector_of(F32, count)),
        constant_vector(F32, [2.0**112] * count),
    )
    out = builder.bitcast(value, vector_of(I32, count))
    top = builder.fcmp_ordered(">=", value, constant_vector(F32, [65536.0] * count))
    out = builder.select(top, builder.or_(out, constant(0x7F800000)), out)
    sign = builder.shl(builder.and_(bits, constant(0x8000)), constant(16))
    return builder.bitcast(builder.or_(out, sign), vector_of(F32, count))


def unpacked(builder, words, bits: int, field: int):
    """Field `field` of each of 16 words as floats."""
    value = builder.lshr(words, constant_vector(I32, [bits * field] * BLOCK))
    if field < 32 // bits - 1:  # the top field needs no mask
        mask = (1 << bits) - 1
        value = builder.and_(value, constant_vector(I32, [mask] * BLOCK))
    return builder.sitofp(value, vector_of(F32))


def group_values(builder, halves, w0, words_per_group: int, lanes):
    """The float16 scales (or biases) of the groups of words w0..w0+15, one per word:
    16 / words_per_group groups per block, or one group for 16 words and more."""
    groups = max(1, BLOCK // words_per_group)
    first = builder.udiv(w0, I64(words_per_group))
    mask = None
    if lanes is not None and groups > 1:
        mask = shuffle(builder, lanes, [i * words_per_group for i in range(groups)])
    values = floats_from_halves(builder, load(builder, halves, first, groups, mask))
    return shuffle(
        builder, values, [min(i // words_per_group, groups - 1) for i in range(BLOCK)]
    )


def over_blocks(builder, count, body) -> None:
    """body(start, lanes) for each block of 16 of `count` elements (i64): lanes is
    None for full blocks, the i1 vector of the elements that exist for a last
    partial one."""
    full = builder.udiv(count, I64(BLOCK))
    with cgutils.for_range(builder, full) as loop:
        body(builder.mul(loop.index, I64(BLOCK)), None)
    start = builder.mul(full, I64(BLOCK))
    left = builder.sub(count, start)
    with builder.if_then(builder.icmp_signed(">", left, I64(0)), likely=False):
        lane_ids = constant_vector(I64, range(BLOCK))
        body(start, builder.icmp_signed("<", lane_ids, splat(builder, left)))


def per_format(builder, bits, words_per_group, body) -> None:
    """body(bits, words_per_group) with the format as Python ints, for the format of
    the run-time values (i64): the vector code needs them as constants, so each
    format of quantize.py gets its own code, chosen by a switch."""
    key = builder.add(builder.mul(bits, I64(1000)), words_per_group)
    end = builder.append_basic_block("format.end")
    switch = builder.switch(key, end)  # another format: nothing (kernels.py checks)
    for b, per_group in FORMATS:
        case = builder.append_basic_block(f"format.{b}.{per_group}")
        switch.add_case(I64(b * 1000 + per_group), case)
        builder.position_at_end(case)
        body(b, per_group)
        builder.branch(end)
    builder.position_at_end(end)


def sum_lanes(builder, vector):
    """Sum of the lanes of a <16 x float>, as a tree."""
    count = vector.type.count
    while count > 1:
        count //= 2
        low = shuffle(builder, vector, range(count))
        high = shuffle(builder, vector, range(count, 2 * count))
        vector = builder.fadd(low, high, flags=FLAGS)
    return builder.extract_element(vector, I32(0))


class Rows:
    """Element pointers into the rows of a 2-D array (any row stride) or of a flat
    1-D view with a row stride in elements (the quantized arrays), in IR."""

    def __init__(self, context, builder, array_type, value, stride=None):
        self.builder = builder
        array = context.make_array(array_type)(context, builder, value)
        self.data = array.data
        self.shape = array.shape
        self.stride = stride  # elements, for flat views
        if stride is None:  # bytes, from the array
            self.stride_bytes = builder.extract_value(array.strides, 0)

    def row(self, index):
        builder = self.builder
        if self.stride is not None:
            return builder.gep(self.data, [builder.mul(index, self.stride)])
        raw = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        raw = builder.gep(raw, [builder.mul(index, self.stride_bytes)])
        return builder.bitcast(raw, self.data.type)


def quantized_rows(context, builder, tuple_type, value):
    """(packed, scales, biases) Rows of the tuple kernels.py passes, and the words
    per row (i64)."""
    parts = [builder.extract_value(value, i) for i in range(7)]
    rows = [
        Rows(context, builder, tuple_type[i], parts[i], parts[i + 1]) for i in (0, 2, 4)
    ]
    return (*rows, parts[6])


def integers(*values) -> bool:
    return all(isinstance(value, types.Integer) for value in values)


def ints(builder, value, count: int):
    return [builder.extract_value(value, i) for i in range(count)]


def format_args(context, builder, sig, args, first: int) -> tuple:
    """The (bits, words per group) arguments at args[first:first + 2] as i64."""
    return tuple(
        context.cast(builder, args[i], sig.args[i], types.int64)
        for i in (first, first + 1)
    )
