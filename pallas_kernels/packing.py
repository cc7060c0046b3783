"""Dense bit packing of group-quantized weights into uint32 bit-planes.

A quantized kernel ``w [K, N]`` (``y = x @ w``) is held as signed integer codes ``q [K, N]`` and
scales ``s [ceil(K / gs), N]`` with ``w[k, n] = q[k, n] * s[k // gs, n]`` (gs = group size, 128).
Codes are ``q in [-2^(b-1), 2^(b-1) - 1]`` for b >= 2 and ``q in {-1, +1}`` for b = 1.

Unsigned codes::

    b >= 2:  u = q + 2^(b-1)          q = u - 2^(b-1)
    b == 1:  u = (q + 1) / 2          q = 2 u - 1

Planes. A b-bit code is split into bit-planes of width c in {1, 2, 4, 8}, each exactly c bits
per weight (no containers): 1, 2, 4, 8 bits use one plane of width b; 3 bits use a 2-bit plane
holding ``u & 3`` and a 1-bit plane holding ``u >> 2``, so ``u = lo | (hi << 2)``.

Plane layout. A c-bit plane is ``uint32 [..., Kg, R, Np]`` with ``Kg = ceil(K / gs)`` groups,
``R = gs * c / 32`` words per group and column, ``P = 32 / c`` codes per word. Word
``plane[g, r, n]`` holds, in bits ``[j*c, (j+1)*c)`` for slot ``j = 0 .. P-1``, the piece of
row ``k = g*gs + t`` of column ``n``, where the in-group row ``t`` is::

    slot-major  (R % 8 == 0; gs=128: c = 2, 4, 8):  t = j * R + r
    word-major  (otherwise;  gs=128: c = 1):        t = r * P + j
    paired      (the 1-bit plane of 3-bit codes; R2 = the 2-bit plane's R = 2 R):
                bit 16 h + j of word r holds the high bit of the code in slot j (j < 16) of
                the 2-bit plane's word r + h R, i.e. t = t2(r + h R, j) in that plane's order

    gs = 128, c = 2 (R = 8, P = 16), one group, one column n:
      word r=0: [ t=0 | t=8  | t=16 | ... | t=120 ]   bits 0-1, 2-3, 4-5, ..., 30-31
      word r=1: [ t=1 | t=9  | t=17 | ... | t=121 ]
      ...
      word r=7: [ t=7 | t=15 | t=23 | ... | t=127 ]
    gs = 128, c = 1 (R = 4, P = 32):
      word r=0: [ t=0  | t=1  | ... | t=31  ]         bit j holds t = j
      word r=3: [ t=96 | t=97 | ... | t=127 ]
    gs = 128, 3 bits' c = 1 plane (paired, R = 4):
      word r=0: [ t=0 | t=8 | ... | t=120 | t=4 | t=12 | ... | t=124 ]   (2-bit words 0 and 4)
      word r=3: [ t=3 | t=11 | ... | t=123 | t=7 | t=15 | ... | t=127 ]  (2-bit words 3 and 7)

Why paired: each code's two pieces then sit in words of the same index pair, so whoever unpacks
the 2-bit word has the high bits at hand (``unpack_tile_registers``: one thread, one dot).
``LAYOUT_VERSION`` 1 held that plane word-major, like a 1-bit code's.

Slot- and word-major planes unpack one group's ``[R, bn]`` word tile to ``[gs, bn]`` codes with
a broadcast, a shift by a ``broadcasted_iota``, a mask and a reshape whose merged second-minor
dimension (R or P) is a multiple of 8: no gather, no stack, power-of-two sizes (Triton), and
(8, 128)-aligned tiles (Mosaic TPU). A paired plane first splits its words into 16-bit halves
``[2 R, bn]`` the same way (a reshape that merges R = 4 rows at gs = 128: Mosaic TPU takes that
only through a smaller sublane tiling, or not at all in older versions) and then reads like a
1-bit plane of 16-slot words in the 2-bit plane's order; the Mosaic kernel instead unpacks
3-bit codes in ``paired_word_order`` with x's columns permuted to match. N is the lane
(contiguous) dimension.

Padding (round-trips; stripped by ``unpack``/``dequantize``): K is padded to ``Kg * gs`` with
code q = 0 (q = -1 for b = 1); each of the ``parts`` column blocks of width ``Nq = N / parts``
is padded to ``Nqp``, a multiple of 128, with the same pad code and scale 0. A fused gate/up
kernel ``[K, 2F]`` is packed with ``parts=2`` so its up half starts at the 128-aligned column
``Fp``.

Dequantizing weight (k, n) of column block i = n // Nq: column ``c = i * Nqp + n % Nq``,
``g, t = divmod(k, gs)``; per plane get (r, j) from t as above and read
``(plane[g, r, c] >> (j * width)) & (2^width - 1)``; combine the planes into u, map u to q, and
``w = q * scales[g, c]``.

Stacked experts: every function accepts leading batch dimensions, e.g. ``codes [G, K, N]``
gives planes ``[G, Kg, R, Np]`` and scales ``[G, Kg, Np]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SUPPORTED_BITS = (1, 2, 3, 4, 8)
LAYOUT_VERSION = 2  # bump when the bit layout changes; packed-model files and stages record it
COLUMN_ALIGN = 128


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes that hold a ``bits``-bit code, low bits first."""
    _check_bits(bits)
    return (2, 1) if bits == 3 else (bits,)


def words_per_group(width: int, group_size: int) -> int:
    """R: uint32 words per group and column in a plane of ``width`` bits."""
    return group_size * width // 32


def is_slot_major(width: int, group_size: int) -> bool:
    """Whether a plane uses the slot-major in-group order (see the module docstring)."""
    return words_per_group(width, group_size) % 8 == 0


def is_paired(bits: int, plane: int) -> bool:
    """Whether plane number ``plane`` of ``bits``-bit codes uses the paired order."""
    return bits == 3 and plane == 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """Packed codes and scales of a ``[..., K, N]`` kernel; how to read them: module docstring.

    ``planes``: uint32 ``[..., Kg, R_i, Np]`` per plane; ``scales``: ``[..., Kg, Np]``.
    ``k``, ``n`` are the logical (unpadded) sizes; ``parts`` column blocks of ``n / parts``
    columns are each padded to a multiple of 128 (``Np = parts * part_padded``).
    """

    planes: tuple[jax.Array, ...]
    scales: jax.Array
    bits: int = dataclasses.field(metadata={"static": True})
    k: int = dataclasses.field(metadata={"static": True})
    n: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(default=128, metadata={"static": True})
    parts: int = dataclasses.field(default=1, metadata={"static": True})

    @property
    def num_groups_k(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def k_padded(self) -> int:
        return self.num_groups_k * self.group_size

    @property
    def part_n(self) -> int:
        return self.n // self.parts

    @property
    def part_padded(self) -> int:
        return _round_up(self.part_n, COLUMN_ALIGN)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.scales.shape[:-2])


def pack(codes, scales, bits: int, *, group_size: int = 128, parts: int = 1) -> PackedWeight:
    """Packs signed codes ``[..., K, N]`` and scales ``[..., ceil(K/gs), N]`` densely.

    Raises ValueError for an unsupported bit width, mismatched shapes, or (for concrete
    arrays) codes outside the signed range of ``bits``.
    """
    _check_bits(bits)
    _check_code_range(codes, bits)
    codes = jnp.asarray(codes)
    scales = jnp.asarray(scales)
    _check_group_size(group_size)
    if codes.ndim < 2:
        raise ValueError(f"codes must be [..., K, N], got shape {codes.shape}")
    *batch, k, n = codes.shape
    kg = -(-k // group_size)
    if scales.shape != (*batch, kg, n):
        raise ValueError(
            f"scales shape {scales.shape} does not match codes {codes.shape}: expected "
            f"{(*batch, kg, n)} (one scale per {group_size} rows and column)"
        )
    if parts < 1 or n % parts:
        raise ValueError(f"parts={parts} must be >= 1 and divide N={n}")
    planes, packed_scales = _pack_arrays(codes, scales, bits, group_size, parts)
    return PackedWeight(planes, packed_scales, bits, k, n, group_size, parts)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _pack_arrays(codes, scales, bits, group_size, parts):
    kg = -(-codes.shape[-2] // group_size)
    k = codes.shape[-2]
    u = _to_unsigned(codes.astype(jnp.int32), bits)
    u = _pad_rows(u, kg * group_size - k, _unsigned_pad_value(bits))
    u = _pad_parts(u, parts, _unsigned_pad_value(bits))
    planes = []
    shift = 0
    for i, width in enumerate(plane_widths(bits)):
        piece = (u >> shift) & ((1 << width) - 1)
        if is_paired(bits, i):  # 16-bit halves ordered as the 2-bit plane's words, then folded
            halves = _pack_plane(piece, width, group_size, slots=16, r=group_size // 16,
                                 slot_major=is_slot_major(2, group_size))
            half_r = halves.shape[-2] // 2
            planes.append(halves[..., :half_r, :] | (halves[..., half_r:, :] << 16))
        else:
            planes.append(_pack_plane(piece, width, group_size))
        shift += width
    return tuple(planes), _pad_parts(scales, parts, 0)


def unpack_tile(words: tuple[jax.Array, ...], bits: int, group_size: int, *,
                word_rows: bool = False) -> jax.Array:
    """Signed int32 codes ``[gs, bn]`` of one group from its plane tiles ``[R_i, bn]``.

    Only broadcasts, iota shifts, masks and one reshape per plane: safe inside Triton and
    Mosaic TPU kernels. Works on uint32 or int32 words. ``word_rows`` (3 bits): rows in
    ``paired_word_order`` instead of the natural order.
    """
    return _to_signed(_unpack_unsigned_tile(words, bits, group_size, word_rows), bits)


def unpack_tile_float(words: tuple[jax.Array, ...], bits: int, group_size: int, *,
                      word_rows: bool = False) -> jax.Array:
    """``unpack_tile`` as exact float32 codes, built without int-to-float conversions.

    ``u | 0x4B000000`` read as float32 is ``2^23 + u`` (u < 2^23 sits in the mantissa), so one
    OR and one subtraction give the signed code; GPUs convert int to float at a quarter of
    their ALU rate, and a tile converts every one of its ``gs * bn`` codes.
    """
    u = _unpack_unsigned_tile(words, bits, group_size, word_rows)
    f = lax.bitcast_convert_type(u | 0x4B000000, jnp.float32)
    if bits == 1:
        return 2 * (f - 2.0**23) - 1  # q = 2u - 1; each step is exact in float32
    return f - (2.0**23 + (1 << (bits - 1)))


def paired_word_order(group_size: int) -> np.ndarray:
    """Row order of ``unpack_tile(..., word_rows=True)`` for 3 bits: tile row ``o = 16 r + j``
    holds slot j of the 2-bit plane's word r, natural row ``perm[o]``.

    Why: a paired plane's natural rows interleave 4-row pieces (R = 4 at gs = 128), which
    Mosaic TPU reshapes only off its native (8, 128) tiles, or not at all in older versions. In
    word order every reshape merges 16 slots (whole tiles), and the kernel takes x's columns
    in the same order instead (one permutation per call).
    """
    r2 = words_per_group(2, group_size)
    word, slot = np.meshgrid(np.arange(r2), np.arange(16), indexing="ij")
    natural = slot * r2 + word if is_slot_major(2, group_size) else word * 16 + slot
    return natural.ravel()


REGISTER_ORDER_LANES = 4  # MMA lanes that split one 16-row k-step, 4 rows each (kWidth 4)


def has_register_order(width: int, group_size: int) -> bool:
    """Whether ``register_order`` exists: words and slots both split over the 4 lanes."""
    lanes = REGISTER_ORDER_LANES
    return words_per_group(width, group_size) % lanes == 0 and (32 // width) % lanes == 0


def codes_have_register_order(bits: int, group_size: int) -> bool:
    """Whether ``unpack_tile_registers`` serves ``bits``-bit codes of this group size (3 bits:
    also a paired word's two 2-bit words on one lane)."""
    if bits == 3:
        return has_register_order(2, group_size) and words_per_group(1, group_size) % 4 == 0
    return has_register_order(bits, group_size)


def codes_register_order(bits: int, group_size: int) -> np.ndarray:
    """``register_order`` of ``bits``-bit codes: 3 bits unpack in their 2-bit plane's order."""
    if not codes_have_register_order(bits, group_size):
        raise ValueError(f"no register order for {bits}-bit codes of group {group_size}")
    return register_order(plane_widths(bits)[0], group_size)


def register_order(width: int, group_size: int) -> np.ndarray:
    """In-group row order of ``unpack_tile_registers``: tile row i holds natural row ``perm[i]``.

    Why: a GPU tensor-core (mma) B fragment gives each of 4 lanes 4 consecutive rows of every
    16-row k-step. Word r goes to lane ``r % 4`` and its slots fill that lane's rows, so every
    lane unpacks whole words it holds and the tile needs no shuffle through shared memory.
    Slots j and j + P/2 (16 bits apart) take adjacent rows, so one 32-bit register holds both
    as a bf16 pair. With ``r = 4 r_hi + lane``, slot position ``e = 2 (j mod P/2) + j // (P/2)``
    and ``e = 4 e_hi + e_lo`` the tile row is ``i = 16 (r_hi P/4 + e_hi) + 4 lane + e_lo``. A
    matmul over the tile needs x's columns in the same order (``x[:, perm]`` per group):
    permuting both sides of a dot leaves it unchanged.
    """
    r, p = words_per_group(width, group_size), 32 // width
    lanes = REGISTER_ORDER_LANES
    if not has_register_order(width, group_size):
        raise ValueError(f"no register order for {width}-bit planes of group {group_size}")
    word, slot = np.meshgrid(np.arange(r), np.arange(p), indexing="ij")
    natural = slot * r + word if is_slot_major(width, group_size) else word * p + slot
    pos = np.argsort(_register_slots(p))[slot]
    row = 16 * ((word // lanes) * (p // lanes) + pos // lanes) + lanes * (word % lanes)
    row = row + pos % lanes
    perm = np.empty(group_size, np.int64)
    perm[row.ravel()] = natural.ravel()
    return perm


def unpack_tile_registers(words: tuple[jax.Array, ...], bits: int, group_size: int) -> jax.Array:
    """Unsigned int32 codes ``[gs, bn]`` of one group in ``codes_register_order``.

    Each slot is a shift and a mask of the whole word tile; the slots are gathered with
    2-way joins (Triton's ``tt.join`` keeps them in the thread that holds the word), and one
    transpose and reshape put them in ``register_order``'s rows. 3 bits: the paired plane's
    halves are first lined up with the 2-bit words (on words, not codes), then each slot ORs
    its high bit in.
    """
    tiles = [_as_int32(w) for w in words]
    width = plane_widths(bits)[0]
    if bits == 3:
        lo, halves = tiles[0], _paired_halves(tiles[1])
        piece = lambda j: ((lax.shift_right_logical(lo, 2 * j) & 3)
                           | ((lax.shift_right_logical(halves, j) & 1) << 2))
    else:
        (tile,) = tiles
        piece = lambda j: lax.shift_right_logical(tile, j * width) & ((1 << width) - 1)
    p = 32 // width
    return _register_rows([piece(j) for j in _register_slots(p)], group_size)


def unpack_tile_registers_bf16(words: tuple[jax.Array, ...], bits: int,
                               group_size: int) -> jax.Array:
    """bf16 ``128 + u`` ``[gs, bn]`` (bits <= 4) in ``codes_register_order``, a pair at a time.

    Slots j and j + P/2 of a word are 16 bits apart, and ``register_order`` puts them on
    adjacent rows of one thread: a shift, a mask and an OR of the word give both codes' bf16
    bit patterns (``0x4300 | u`` = 128 + u) in the two halves of one 32-bit value, which is the
    register the tensor cores read for that row pair (3 bits: one more shift and mask bring
    the high bits in, spread once per word).
    """
    if bits > 4:
        raise ValueError(f"{bits}-bit codes do not fit bf16's 7-bit mantissa as 128 + u")
    tiles = [_as_int32(w) for w in words]
    width = plane_widths(bits)[0]
    mask = (1 << width) - 1
    if bits == 3:  # the high bits of slots j, j + 8 moved to bits 2 + j and 18 + j
        lo, halves = tiles[0], _paired_halves(tiles[1])
        high = ((halves & 0xFF) | ((halves & 0xFF00) << 8)) << 2
        both = lambda j: ((lax.shift_right_logical(lo, 2 * j) & 0x00030003)
                          | (lax.shift_right_logical(high, j) & 0x00040004))
    else:
        (tile,) = tiles
        both = lambda j: lax.shift_right_logical(tile, j * width) & (mask | (mask << 16))
    pieces = []  # in position order e: slot j, then slot j + P/2
    for j in range(16 // width):
        t = both(j) | 0x43004300
        for half in (t, lax.shift_right_logical(t, 16)):
            pieces.append(lax.bitcast_convert_type(half.astype(jnp.int16), jnp.bfloat16))
    return _register_rows(pieces, group_size)


def _paired_halves(paired: jax.Array) -> jax.Array:
    """Paired words ``[R, bn]`` -> 16-bit halves ``[2 R, bn]`` lined up with the 2-bit words
    (row h R + r: half h of word r), by a 2-way join and a transpose: Triton keeps both halves
    in the thread that holds the word (``_halves`` makes the same rows for the natural order)."""
    r, bn = paired.shape
    pair = jnp.stack([paired & 0xFFFF, lax.shift_right_logical(paired, 16)], axis=-1)
    return jnp.transpose(pair, (2, 0, 1)).reshape(2 * r, bn)


def _register_rows(pieces: list[jax.Array], group_size: int) -> jax.Array:
    """Per-position pieces ``[R, bn]`` (position e of ``_register_slots``) -> the tile
    ``[gs, bn]`` in ``register_order``'s rows."""
    r, bn = pieces[0].shape
    p, lanes = len(pieces), REGISTER_ORDER_LANES
    stacked = _stack_last(pieces)  # [r, bn, p], last = e
    tile = stacked.reshape(r // lanes, lanes, bn, p // lanes, lanes)  # r_hi, lane, n, e_hi, e_lo
    return jnp.transpose(tile, (0, 3, 1, 4, 2)).reshape(group_size, bn)


def _as_int32(words: jax.Array) -> jax.Array:
    return words if words.dtype == jnp.int32 else lax.bitcast_convert_type(words, jnp.int32)


def _register_slots(p: int) -> list[int]:
    """The slot at each position e of a word's rows: slots j and j + P/2 side by side."""
    return [(e % 2) * (p // 2) + e // 2 for e in range(p)]


def _stack_last(pieces: list[jax.Array]) -> jax.Array:
    """``jnp.stack(pieces, -1)`` from 2-way stacks only (all Triton lowers); len a power of 2."""
    lead = pieces[0].ndim
    while len(pieces) > 1:  # pair j with j + half: each new axis is j's highest remaining bit
        half = len(pieces) // 2
        pieces = [jnp.stack([pieces[i], pieces[i + half]], axis=-1) for i in range(half)]
    out = pieces[0]  # trailing axes hold j's bits, most significant first
    return out.reshape(*out.shape[:lead], -1)


@jax.jit
def unpack(packed: PackedWeight) -> jax.Array:
    """Signed int32 codes ``[..., K, N]`` (padding stripped)."""
    *batch, kg, _, npad = packed.planes[0].shape
    tiles = [p.reshape(-1, p.shape[-2], npad) for p in packed.planes]
    one = lambda *w: unpack_tile(w, packed.bits, packed.group_size)
    codes = jax.vmap(one)(*tiles)  # [prod(batch) * kg, gs, Np]
    codes = codes.reshape(*batch, kg * packed.group_size, npad)[..., : packed.k, :]
    return _strip_parts(codes, packed)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(packed: PackedWeight, dtype=jnp.float32) -> jax.Array:
    """``w [..., K, N] = q * s`` in ``dtype`` (computed in float32)."""
    codes = unpack(packed).astype(jnp.float32)
    scales = _strip_parts(packed.scales, packed).astype(jnp.float32)
    rows = jnp.repeat(scales, packed.group_size, axis=-2)[..., : packed.k, :]
    return (codes * rows).astype(dtype)


def nbytes(packed: PackedWeight) -> int:
    """Bytes actually stored: all planes plus scales."""
    return (
        sum(int(p.size) * p.dtype.itemsize for p in packed.planes)
        + int(packed.scales.size) * packed.scales.dtype.itemsize
    )


def theoretical_nbytes(
    k: int, n: int, bits: int, *, group_size: int = 128, scale_dtype=jnp.bfloat16, batch: int = 1
) -> int:
    """Ideal bytes: ``K*N*bits/8`` for the codes plus one scale per group and column."""
    _check_bits(bits)
    code_bytes = math.ceil(k * n * bits / 8)
    scale_bytes = -(-k // group_size) * n * jnp.dtype(scale_dtype).itemsize
    return batch * (code_bytes + scale_bytes)


# ---------------------------------------------------------------- helpers


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")


def _check_group_size(group_size: int) -> None:
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size} must be a power of two >= 32")


def _check_code_range(codes, bits: int) -> None:
    if isinstance(codes, jax.core.Tracer):
        return
    c = np.asarray(codes)
    if c.size == 0:
        return
    if bits == 1:
        bad = ~np.isin(c, (-1, 1))
        allowed = "{-1, +1}"
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        bad = (c < lo) | (c > hi)
        allowed = f"[{lo}, {hi}]"
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{bits}-bit codes must lie in {allowed}; found {int(c[first])} at index {first}"
        )


def _to_unsigned(q: jax.Array, bits: int) -> jax.Array:
    u = (q + 1) // 2 if bits == 1 else q + (1 << (bits - 1))
    return u.astype(jnp.uint32)


def _to_signed(u: jax.Array, bits: int) -> jax.Array:
    u = u.astype(jnp.int32)
    return 2 * u - 1 if bits == 1 else u - (1 << (bits - 1))


def _unsigned_pad_value(bits: int) -> int:
    return 0 if bits == 1 else 1 << (bits - 1)


def _pad_rows(a: jax.Array, extra: int, value) -> jax.Array:
    if not extra:
        return a
    widths = [(0, 0)] * (a.ndim - 2) + [(0, extra), (0, 0)]
    return jnp.pad(a, widths, constant_values=value)


def _pad_parts(a: jax.Array, parts: int, value) -> jax.Array:
    """Splits the last axis into ``parts`` blocks and pads each to a multiple of 128."""
    part_n = a.shape[-1] // parts
    extra = _round_up(part_n, COLUMN_ALIGN) - part_n
    if not extra:
        return a
    a = a.reshape(*a.shape[:-1], parts, part_n)
    widths = [(0, 0)] * (a.ndim - 1) + [(0, extra)]
    a = jnp.pad(a, widths, constant_values=value)
    return a.reshape(*a.shape[:-2], parts * (part_n + extra))


def _strip_parts(a: jax.Array, packed: PackedWeight) -> jax.Array:
    part_n, part_p = packed.part_n, packed.part_padded
    if part_n == part_p:
        return a
    a = a.reshape(*a.shape[:-1], packed.parts, part_p)[..., :part_n]
    return a.reshape(*a.shape[:-2], packed.n)


def _pack_plane(piece: jax.Array, width: int, group_size: int, *, slots: int | None = None,
                r: int | None = None, slot_major: bool | None = None) -> jax.Array:
    """``piece [..., Kp, Np]`` (values < 2^width) -> words ``[..., Kg, R, Np]``; ``slots``, ``r``
    and ``slot_major`` default to a plane of ``width`` (a paired plane's halves override them)."""
    *batch, kp, npad = piece.shape
    kg = kp // group_size
    r = words_per_group(width, group_size) if r is None else r
    p = 32 // width if slots is None else slots
    slot_major = is_slot_major(width, group_size) if slot_major is None else slot_major
    shifts = jnp.arange(p, dtype=jnp.uint32) * width
    if slot_major:  # t = j * R + r
        piece = piece.reshape(*batch, kg, p, r, npad)
        words = piece << shifts[:, None, None]
        axis = -3
    else:  # t = r * P + j
        piece = piece.reshape(*batch, kg, r, p, npad)
        words = piece << shifts[:, None]
        axis = -2
    # Slots occupy disjoint bits, so the sum is their bitwise OR.
    return jnp.sum(words, axis=axis, dtype=jnp.uint32)


def _unpack_unsigned_tile(words: tuple[jax.Array, ...], bits: int, group_size: int,
                          word_rows: bool = False) -> jax.Array:
    """Unsigned int32 codes ``[gs, bn]``: each plane's pieces shifted into place and OR-ed."""
    if word_rows:
        if bits != 3:
            raise ValueError(f"word_rows applies to 3-bit codes, not {bits}")
        return _unpack_paired_words(words, group_size)
    u = None
    shift = 0
    for i, (width, w) in enumerate(zip(plane_widths(bits), words, strict=True)):
        if is_paired(bits, i):
            piece = _unpack_plane_tile(_halves(_as_int32(w)), width, group_size, slots=16,
                                       slot_major=is_slot_major(2, group_size))
        else:
            piece = _unpack_plane_tile(w, width, group_size)
        u = piece if u is None else u | (piece << shift)
        shift += width
    return u


def _unpack_paired_words(words: tuple[jax.Array, ...], group_size: int) -> jax.Array:
    """3-bit codes ``[gs, bn]`` in ``paired_word_order``: each plane broadcast over its slots
    (``[R2, 16, bn]``; the paired plane as ``[2, R, 16, bn]``, half h = row block h), shifted,
    masked and reshaped with 16 slots minor to the rows (whole Mosaic tiles)."""
    lo, hi = (_as_int32(w) for w in words)
    r2, bn = lo.shape
    if r2 * 16 != group_size or hi.shape[0] * 2 != r2:
        raise ValueError(f"3-bit plane tiles {lo.shape}, {hi.shape} do not fit group {group_size}")
    lo_wide = lax.broadcast_in_dim(lo, (r2, 16, bn), (0, 2))
    lo_piece = lax.shift_right_logical(
        lo_wide, lax.broadcasted_iota(jnp.int32, (r2, 16, bn), 1) * 2) & 3
    shape = (2, r2 // 2, 16, bn)
    hi_wide = lax.broadcast_in_dim(hi, shape, (1, 3))
    shifts = lax.broadcasted_iota(jnp.int32, shape, 2) + 16 * lax.broadcasted_iota(
        jnp.int32, shape, 0)
    hi_piece = lax.shift_right_logical(hi_wide, shifts) & 1
    return lo_piece.reshape(group_size, bn) | (hi_piece.reshape(group_size, bn) << 2)


def _halves(words: jax.Array) -> jax.Array:
    """``_paired_halves`` for the natural order, by a broadcast and an iota shift: the form the
    shifts and reshape around it compile best to ("magic" 3-bit gate/up, sm_90: 9.0
    instructions per code, 10.4 with the join)."""
    r, bn = words.shape
    wide = lax.broadcast_in_dim(words, (2, r, bn), (1, 2))
    shifts = lax.broadcasted_iota(jnp.int32, (2, r, bn), 0) * 16
    return (lax.shift_right_logical(wide, shifts) & 0xFFFF).reshape(2 * r, bn)


def _unpack_plane_tile(words: jax.Array, width: int, group_size: int, *,
                       slots: int | None = None, slot_major: bool | None = None) -> jax.Array:
    """Words ``[R, bn]`` of one group -> unsigned pieces ``int32 [gs, bn]``."""
    r, bn = words.shape
    p = 32 // width if slots is None else slots
    slot_major = is_slot_major(width, group_size) if slot_major is None else slot_major
    words = _as_int32(words)
    if slot_major:
        shape, slot_axis = (p, r, bn), 0
        wide = lax.broadcast_in_dim(words, shape, (1, 2))
    else:
        shape, slot_axis = (r, p, bn), 1
        wide = lax.broadcast_in_dim(words, shape, (0, 2))
    shifts = lax.broadcasted_iota(jnp.int32, shape, slot_axis) * width
    piece = lax.shift_right_logical(wide, shifts) & ((1 << width) - 1)
    return piece.reshape(group_size, bn)
