"""torchquant.ptq.packing: unsigned codes in int32 words, the layout of GPTQ checkpoints.

The layout is checked against two references written here: a bit-by-bit loop
over the documented stream (code i at stream bits [i*bits, (i+1)*bits), stream
bit k in bit k % 32 of word k // 32), and, for 3 bits, the word-by-word
recipe of AutoGPTQ's packer (10 codes, a straddling one, 10 codes, ...).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.ptq.packing import SUPPORTED_BITS, codes_per_block, pack_int32, unpack_int32

SETTINGS = settings(max_examples=60, deadline=None)
BLOCK = {2: 16, 3: 32, 4: 8, 8: 4}  # codes that fill whole words


def to_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def reference_pack_columns(values, bits):
    """Packs the rows of each column of a list-of-lists ``[n][m]`` bit by bit."""
    n, m = len(values), len(values[0])
    words = [[0] * m for _ in range(n * bits // 32)]
    for col in range(m):
        for i in range(n):
            for b in range(bits):
                if (values[i][col] >> b) & 1:
                    k = i * bits + b
                    words[k // 32][col] |= 1 << (k % 32)
    return [[to_int32(w) for w in row] for row in words]


def autogptq_pack_3bit(column):
    """AutoGPTQ's 3-bit recipe for 32 codes -> 3 words, one block at a time."""
    words = []
    for start in range(0, len(column), 32):
        v = column[start:start + 32]
        w0 = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] << 30) & 0xFFFFFFFF)
        w1 = (v[10] >> 2) & 1
        w1 |= sum(v[11 + j] << (3 * j + 1) for j in range(10)) | ((v[21] << 31) & 0xFFFFFFFF)
        w2 = (v[21] >> 1) & 0x3
        w2 |= sum(v[22 + j] << (3 * j + 2) for j in range(10))
        words += [to_int32(w0), to_int32(w1), to_int32(w2)]
    return words


def random_codes(shape, bits, seed=0):
    return torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


# ---- layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_layout_matches_the_bit_by_bit_reference(bits):
    values = random_codes((2 * BLOCK[bits], 3), bits, seed=bits)
    expected = torch.tensor(reference_pack_columns(values.tolist(), bits), dtype=torch.int32)
    assert torch.equal(pack_int32(values, bits, dim=0), expected)
    # Along dim 1 (qzeros) the words are the same, transposed.
    assert torch.equal(pack_int32(values.t(), bits, dim=1), expected.t())


def test_3bit_layout_matches_autogptq_word_recipe():
    values = random_codes((64, 2), 3, seed=7)
    for col in range(2):
        expected = autogptq_pack_3bit(values[:, col].tolist())
        assert pack_int32(values, 3, dim=0)[:, col].tolist() == expected


@pytest.mark.parametrize("position, words", [
    (10, [to_int32(0b11 << 30), 0b1, 0]),  # low two bits end word 0, high bit starts word 1
    (21, [0, to_int32(1 << 31), 0b11]),  # low bit ends word 1, high two bits start word 2
    (0, [0b111, 0, 0]),
    (31, [0, 0, to_int32(0b111 << 29)]),
])
def test_3bit_codes_straddle_word_boundaries(position, words):
    values = torch.zeros(32, 1, dtype=torch.int32)
    values[position] = 0b111
    packed = pack_int32(values, 3, dim=0)
    assert packed[:, 0].tolist() == words
    assert torch.equal(unpack_int32(packed, 3, dim=0), values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_word_widths_put_the_first_code_in_the_lowest_bits(bits):
    per_word = 32 // bits
    values = torch.arange(per_word, dtype=torch.int32).remainder(1 << bits).unsqueeze(1)
    expected = sum(int(v) << (bits * i) for i, v in enumerate(values[:, 0]))
    assert pack_int32(values, bits, dim=0).tolist() == [[to_int32(expected)]]


def test_codes_per_block():
    assert [codes_per_block(b) for b in SUPPORTED_BITS] == [(16, 1), (32, 3), (8, 1), (4, 1)]


# ---- round trips -------------------------------------------------------------------------

@st.composite
def packable(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = BLOCK[bits] * draw(st.integers(1, 3))
    numel = int(torch.Size(shape).numel())
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=numel, max_size=numel))
    return bits, dim, torch.tensor(values, dtype=torch.int64).reshape(shape)


@SETTINGS
@given(packable())
def test_pack_then_unpack_is_exact(case):
    bits, dim, values = case
    packed = pack_int32(values, bits, dim=dim)
    expected_shape = list(values.shape)
    expected_shape[dim] = expected_shape[dim] * bits // 32
    assert packed.dtype == torch.int32 and list(packed.shape) == expected_shape
    restored = unpack_int32(packed, bits, dim=dim)
    assert restored.dtype == torch.int32
    assert torch.equal(restored, values.to(torch.int32))


@SETTINGS
@given(st.sampled_from(SUPPORTED_BITS), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_every_word_pattern_unpacks_and_packs_back(bits, blocks, seed):
    # Includes words with bit 31 set (negative int32).
    words_per_block = codes_per_block(bits)[1]
    words = torch.randint(-2 ** 31, 2 ** 31, (blocks * words_per_block, 2), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    assert torch.equal(pack_int32(unpack_int32(words, bits, dim=0), bits, dim=0), words)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_round_trip(bits):
    values = torch.tensor([0, (1 << bits) - 1] * BLOCK[bits], dtype=torch.int32).reshape(-1, 1)
    assert torch.equal(unpack_int32(pack_int32(values, bits), bits), values)


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, True, None])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_int32(torch.zeros(32, 1, dtype=torch.int32), bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        unpack_int32(torch.zeros(3, 1, dtype=torch.int32), bits)


@pytest.mark.parametrize("bad", [-1, 16])
def test_codes_outside_the_unsigned_range_are_refused(bad):
    values = torch.zeros(8, 2, dtype=torch.int32)
    values[3, 1] = bad
    with pytest.raises(ValueError, match=r"values must lie in \[0, 15\]"):
        pack_int32(values, 4)


def test_float_values_are_refused():
    with pytest.raises(TypeError, match="values must be an integer tensor"):
        pack_int32(torch.zeros(8, 1), 4)


@pytest.mark.parametrize("bits, length", [(3, 16), (4, 12), (2, 8), (8, 6)])
def test_lengths_that_do_not_fill_whole_words_are_refused(bits, length):
    with pytest.raises(ValueError, match=r"values.shape\[0\] = %d must be a multiple of %d" % (length, BLOCK[bits])):
        pack_int32(torch.zeros(length, 1, dtype=torch.int32), bits)


def test_unpack_checks_word_dtype_and_count():
    with pytest.raises(TypeError, match="words must be an int32 tensor"):
        unpack_int32(torch.zeros(3, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"words.shape\[0\] = 4 must be a multiple of 3"):
        unpack_int32(torch.zeros(4, 1, dtype=torch.int32), 3)


def test_dim_out_of_range_is_refused():
    with pytest.raises(ValueError, match="dim must be in"):
        pack_int32(torch.zeros(8, 1, dtype=torch.int32), 4, dim=2)
