"""Dense bit packing: exact round trips, the documented bit layout, dequantization, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import packing

BITS = (1, 2, 3, 4, 8)
# (batch, K, N, group_size, parts): aligned, K not a multiple of the group, odd N, fused halves
# with an odd half width, no batch, other group sizes.
SHAPES = [
    ((2,), 256, 128, 128, 1),
    ((3,), 200, 37, 128, 1),
    ((), 130, 6, 128, 2),
    ((2,), 96, 130, 32, 1),
    ((), 300, 17, 256, 1),
]


def random_codes(rng, bits, shape):
    """Uniform codes over the full signed range, with both extremes present."""
    if bits == 1:
        q = rng.choice(np.array([-1, 1]), size=shape)
        lo, hi = -1, 1
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = rng.integers(lo, hi + 1, size=shape)
    flat = q.reshape(-1)
    flat[0], flat[-1] = lo, hi
    return q.astype(np.int32)


def random_scales(rng, batch, k, n, group_size):
    return rng.uniform(0.01, 0.1, size=(*batch, -(-k // group_size), n)).astype(np.float32)


def read_by_docstring(packed):
    """Brute-force reader of the module docstring's layout (independent of the unpack code)."""
    planes = [np.asarray(p).astype(np.uint64) for p in packed.planes]
    gs, k = packed.group_size, packed.k
    rows = np.arange(k)
    g, t = rows // gs, rows % gs
    u = np.zeros((*planes[0].shape[:-3], k, planes[0].shape[-1]), np.uint64)
    shift = 0
    for i, (width, plane) in enumerate(zip(packed_widths(packed.bits), planes, strict=True)):
        if packed.bits == 3 and i == 1:  # paired: bit 16 h + j of word r <-> 2-bit word r + h R
            r2, half_r = gs * 2 // 32, gs // 32
            if r2 % 8 == 0:
                r_lo, j = t % r2, t // r2
            else:
                r_lo, j = t // 16, t % 16
            r, bit = r_lo % half_r, j + 16 * (r_lo // half_r)
        else:
            r_words, per_word = gs * width // 32, 32 // width
            if r_words % 8 == 0:  # slot-major: t = j * R + r
                j, r = t // r_words, t % r_words
            else:  # word-major: t = r * P + j
                r, j = t // per_word, t % per_word
            bit = j * width
        words = plane[..., g, r, :]  # [..., K, Np]
        piece = (words >> bit.astype(np.uint64)[:, None]) & ((1 << width) - 1)
        u |= piece << np.uint64(shift)
        shift += width
    u = u.astype(np.int64)
    q = 2 * u - 1 if packed.bits == 1 else u - (1 << (packed.bits - 1))
    part_p, part_n = packed.part_padded, packed.part_n
    cols = np.concatenate([np.arange(part_n) + i * part_p for i in range(packed.parts)])
    return q[..., cols]


def packed_widths(bits):
    return {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}[bits]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("batch,k,n,gs,parts", SHAPES)
def test_round_trip_layout_and_dequantize(bits, batch, k, n, gs, parts):
    rng = np.random.default_rng(bits * 1000 + k + n)
    codes = random_codes(rng, bits, (*batch, k, n))
    scales = random_scales(rng, batch, k, n, gs)
    packed = packing.pack(codes, scales, bits, group_size=gs, parts=parts)

    for plane in packed.planes:
        assert plane.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed)), codes)
    np.testing.assert_array_equal(read_by_docstring(packed), codes)

    expected = codes.astype(np.float32) * np.repeat(scales, gs, axis=-2)[..., :k, :]
    np.testing.assert_array_equal(np.asarray(packing.dequantize(packed)), expected)


@pytest.mark.parametrize("bits", BITS)
def test_stored_bytes_equal_theory(bits):
    rng = np.random.default_rng(bits)
    codes = random_codes(rng, bits, (4, 256, 384))
    scales = jnp.asarray(random_scales(rng, (4,), 256, 384, 128), jnp.bfloat16)
    packed = packing.pack(codes, scales, bits)
    theory = packing.theoretical_nbytes(256, 384, bits, scale_dtype=jnp.bfloat16, batch=4)
    assert packing.nbytes(packed) == theory == 4 * (256 * 384 * bits // 8 + 2 * 384 * 2)


def test_odd_shapes_store_the_padded_theory():
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 3, (200, 37))
    packed = packing.pack(codes, random_scales(rng, (), 200, 37, 128), 3)
    padded = packing.theoretical_nbytes(256, 128, 3, scale_dtype=jnp.float32)
    assert packing.nbytes(packed) == padded


def test_mixed_map_at_kimi_shapes_is_within_two_percent():
    """Kimi-VL experts: gate/up [2048, 2*1408] and down [1408, 2048] at 2, 3 and 4 bits."""
    stored = theory = 0
    for bits in (2, 3, 4):
        for k, n, parts in ((2048, 2816, 2), (1408, 2048, 1)):
            shapes = jax.eval_shape(
                lambda q, s, b=bits, p=parts: packing.pack(q, s, b, parts=p),
                jax.ShapeDtypeStruct((2, k, n), jnp.int32),
                jax.ShapeDtypeStruct((2, k // 128, n), jnp.bfloat16),
            )
            stored += sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))
            theory += packing.theoretical_nbytes(k, n, bits, batch=2)
    assert stored == theory  # the 2% budget is not even needed: no padding at these shapes


def test_pytree_jit_and_stacking():
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 3, (3, 128, 128))
    scales = random_scales(rng, (3,), 128, 128, 128)
    stacked = packing.pack(codes, scales, 3)
    singles = [packing.pack(codes[i], scales[i], 3) for i in range(3)]
    restacked = jax.tree.map(lambda *a: jnp.stack(a), *singles)
    assert jax.tree.structure(restacked) == jax.tree.structure(stacked)
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.tree.leaves(stacked)) == 3  # two planes + scales; metadata is static

    jitted = jax.jit(lambda q, s: packing.unpack(packing.pack(q, s, 3)))(codes, scales)
    np.testing.assert_array_equal(np.asarray(jitted), codes)


@pytest.mark.parametrize(
    "bits,bad,match",
    [(5, 0, "bits=5"), (3, 4, r"\[-4, 3\]"), (2, -3, r"\[-2, 1\]"), (1, 0, r"\{-1, \+1\}")],
)
def test_bad_codes_and_bits_raise(bits, bad, match):
    codes = np.ones((128, 8), np.int32)
    codes[5, 3] = bad
    with pytest.raises(ValueError, match=match):
        packing.pack(codes, np.ones((1, 8), np.float32), bits)


def test_bad_shapes_raise():
    codes = np.zeros((130, 8), np.int32)
    with pytest.raises(ValueError, match="scales shape"):
        packing.pack(codes, np.ones((1, 8)), 4)
    with pytest.raises(ValueError, match="parts=3"):
        packing.pack(codes, np.ones((2, 8)), 4, parts=3)
    with pytest.raises(ValueError, match="group_size=100"):
        packing.pack(codes, np.ones((2, 8)), 4, group_size=100)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_float_unpack_equals_integer_unpack(bits):
    """The exponent-bit construction gives exactly the integer codes, over their full range."""
    rng = np.random.default_rng(bits)
    lo, hi = (-1, 2) if bits == 1 else (-(1 << (bits - 1)), 1 << (bits - 1))
    codes = rng.integers(lo, hi, size=(256, 128))
    codes = np.where(codes == 0, 1, codes) if bits == 1 else codes
    codes[:2, 0] = [lo, hi - 1]  # both ends of the range
    packed = packing.pack(codes, jnp.ones((2, 128), jnp.bfloat16), bits)
    for g in range(2):
        words = tuple(p[g] for p in packed.planes)
        ints = packing.unpack_tile(words, bits, 128)
        floats = packing.unpack_tile_float(words, bits, 128)
        assert floats.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(floats), np.asarray(ints, np.float32))
        np.testing.assert_array_equal(np.asarray(ints), codes[g * 128:(g + 1) * 128])


@pytest.mark.parametrize("bits,group_size", [(1, 128), (2, 128), (3, 128), (4, 128), (8, 128),
                                             (2, 64), (3, 256), (4, 256), (1, 256)])
def test_register_order_unpack_is_the_natural_codes_permuted(bits, group_size):
    """``unpack_tile_registers`` gives row i = natural row perm[i], and lane (i % 16) // 4 only
    reads words w with w % 4 equal to it (the docstring layout decides which word holds a row;
    3 bits: the 2-bit word, whose paired word shares its lane when R / 2 % 4 == 0)."""
    rng = np.random.default_rng(bits)
    codes = random_codes(rng, bits, (2 * group_size, 128))
    packed = packing.pack(codes, jnp.ones((2, 128), jnp.bfloat16), bits, group_size=group_size)
    perm = packing.codes_register_order(bits, group_size)
    assert sorted(perm.tolist()) == list(range(group_size))
    unsigned = (codes + 1) // 2 if bits == 1 else codes + (1 << (bits - 1))
    for g in range(2):
        tile = packing.unpack_tile_registers(tuple(p[g] for p in packed.planes), bits,
                                             group_size)
        np.testing.assert_array_equal(np.asarray(tile), unsigned[g * group_size + perm])
    width = packed_widths(bits)[0]
    r, p = packing.words_per_group(width, group_size), 32 // width
    word = perm % r if packing.is_slot_major(width, group_size) else perm // p
    lane = (np.arange(group_size) % 16) // 4
    np.testing.assert_array_equal(word % 4, lane)


@pytest.mark.parametrize("bits,group_size", [(1, 32), (1, 64), (2, 32), (3, 64)])
def test_register_order_needs_words_for_every_lane(bits, group_size):
    assert not packing.codes_have_register_order(bits, group_size)
    with pytest.raises(ValueError, match="no register order"):
        packing.codes_register_order(bits, group_size)


@pytest.mark.parametrize("bits,group_size", [(1, 128), (2, 128), (3, 128), (4, 128), (2, 64),
                                             (3, 256), (1, 256)])
def test_bf16_pair_unpack_is_128_plus_the_register_codes(bits, group_size):
    """The pair-at-a-time construction gives exactly bf16(128 + u) of ``unpack_tile_registers``
    (itself checked against the natural codes above), over the full code range."""
    rng = np.random.default_rng(10 + bits)
    codes = random_codes(rng, bits, (2 * group_size, 256))
    packed = packing.pack(codes, jnp.ones((2, 256), jnp.bfloat16), bits, group_size=group_size)
    for g in range(2):
        words = tuple(p[g] for p in packed.planes)
        v = packing.unpack_tile_registers_bf16(words, bits, group_size)
        assert v.dtype == jnp.bfloat16
        u = packing.unpack_tile_registers(words, bits, group_size)
        np.testing.assert_array_equal(np.asarray(v, np.float32), 128.0 + np.asarray(u))


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_paired_word_order_unpack_is_the_natural_codes_permuted(group_size):
    """3-bit codes in Mosaic's word order: row o holds natural row perm[o], for the group sizes
    with slot-major (>= 128) and word-major (< 128) 2-bit planes."""
    rng = np.random.default_rng(group_size)
    codes = random_codes(rng, 3, (2 * group_size, 128))
    packed = packing.pack(codes, jnp.ones((2, 128), jnp.bfloat16), 3, group_size=group_size)
    perm = packing.paired_word_order(group_size)
    assert sorted(perm.tolist()) == list(range(group_size))
    for g in range(2):
        words = tuple(p[g] for p in packed.planes)
        ints = packing.unpack_tile(words, 3, group_size, word_rows=True)
        floats = packing.unpack_tile_float(words, 3, group_size, word_rows=True)
        np.testing.assert_array_equal(np.asarray(ints), codes[g * group_size + perm])
        np.testing.assert_array_equal(np.asarray(floats), np.asarray(ints, np.float32))
    with pytest.raises(ValueError, match="3-bit"):
        packing.unpack_tile((packed.planes[0][0],), 2, group_size, word_rows=True)
