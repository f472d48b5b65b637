"""Tests for kvtier.keys: chained chunk keys, namespaces, accepted token inputs and errors."""

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.keys import (
    KEY_BYTES,
    MAX_TOKEN_ID,
    ChunkKeyer,
    chunk_keys,
    namespace_key,
    token_bytes,
)

torch = pytest.importorskip("torch")

FP = bytes(range(16))
NS = namespace_key("test-model", FP)


def reference_chunk_keys(tokens, chunk_tokens, namespace):
    """Spec transcribed as plainly as possible: no numpy, one struct.pack per chunk."""
    keys = []
    prev = namespace
    for start in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        data = prev + struct.pack(f"<{chunk_tokens}i", *chunk)
        prev = hashlib.blake2b(data, digest_size=16).digest()
        keys.append(prev)
    return keys


def reference_namespace_key(model_id, fingerprint, salt):
    def field(b):
        return struct.pack("<I", len(b)) + b

    data = b"kvtier-ns-v1" + field(model_id.encode()) + field(fingerprint)
    data += b"\x00" if salt is None else b"\x01" + field(salt)
    return hashlib.blake2b(data, digest_size=16).digest()


def random_tokens(n, seed=0, high=128_000):
    return np.random.default_rng(seed).integers(0, high, n).tolist()


# ---------------------------------------------------------------------------------------------
# Chaining and full chunks


def test_matches_reference_implementation():
    tokens = random_tokens(1000)
    assert chunk_keys(tokens, 64, NS) == reference_chunk_keys(tokens, 64, NS)


def test_keys_are_16_bytes():
    keys = chunk_keys(random_tokens(512), 256, NS)
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys)


def test_only_full_chunks_get_keys():
    assert len(chunk_keys(random_tokens(600), 256, NS)) == 2
    assert len(chunk_keys(random_tokens(512), 256, NS)) == 2
    assert len(chunk_keys(random_tokens(255), 256, NS)) == 0
    assert chunk_keys([], 256, NS) == []


def test_partial_tail_does_not_change_keys():
    tokens = random_tokens(512)
    assert chunk_keys(tokens, 256, NS) == chunk_keys(tokens + [1, 2, 3], 256, NS)


def test_shared_prefix_gives_equal_leading_keys():
    prefix = random_tokens(768, seed=1)
    a = chunk_keys(prefix + random_tokens(512, seed=2), 256, NS)
    b = chunk_keys(prefix + random_tokens(512, seed=3), 256, NS)
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:]))


@pytest.mark.parametrize("changed_chunk", [0, 1, 3])
def test_change_in_chunk_i_changes_keys_from_i_on(changed_chunk):
    tokens = random_tokens(4 * 64, seed=4)
    edited = list(tokens)
    edited[changed_chunk * 64 + 17] += 1
    a, b = chunk_keys(tokens, 64, NS), chunk_keys(edited, 64, NS)
    assert a[:changed_chunk] == b[:changed_chunk]
    assert all(x != y for x, y in zip(a[changed_chunk:], b[changed_chunk:]))


def test_same_tokens_in_another_position_get_another_key():
    # The chain names the prefix: an identical chunk after a different history differs.
    chunk = random_tokens(64, seed=5)
    a = chunk_keys(chunk + chunk, 64, NS)
    assert a[0] != a[1]


def test_chain_extends_from_last_key():
    tokens = random_tokens(640, seed=6)
    full = chunk_keys(tokens, 64, NS)
    head = chunk_keys(tokens[:192], 64, NS)
    tail = chunk_keys(tokens[192:], 64, head[-1])
    assert head + tail == full


def test_chunk_size_changes_keys():
    tokens = random_tokens(512)
    assert chunk_keys(tokens, 128, NS)[1] != chunk_keys(tokens, 256, NS)[0]


def test_max_token_id_and_zero_are_valid():
    tokens = [0, MAX_TOKEN_ID] * 8
    assert chunk_keys(tokens, 16, NS) == reference_chunk_keys(tokens, 16, NS)


# ---------------------------------------------------------------------------------------------
# Namespaces


def test_namespace_matches_reference_encoding():
    assert namespace_key("m", FP) == reference_namespace_key("m", FP, None)
    assert namespace_key("m", FP, b"s") == reference_namespace_key("m", FP, b"s")


def test_namespace_is_16_bytes_and_deterministic():
    assert len(NS) == 16
    assert namespace_key("test-model", FP) == NS


@pytest.mark.parametrize(
    "other",
    [
        namespace_key("other-model", FP),
        namespace_key("test-model", bytes(16)),
        namespace_key("test-model", FP, tenant_salt=b"tenant-a"),
        namespace_key("test-model", FP, tenant_salt=b""),
    ],
    ids=["model_id", "fingerprint", "salt", "empty_salt"],
)
def test_each_namespace_field_changes_every_key(other):
    tokens = random_tokens(1024)
    a, b = chunk_keys(tokens, 256, NS), chunk_keys(tokens, 256, other)
    assert len(a) == len(b) == 4
    assert all(x != y for x, y in zip(a, b))


def test_missing_salt_differs_from_empty_salt():
    assert namespace_key("m", FP, None) != namespace_key("m", FP, b"")


def test_tenants_are_separated():
    assert namespace_key("m", FP, b"tenant-a") != namespace_key("m", FP, b"tenant-b")


def test_fields_are_length_prefixed():
    assert namespace_key("ab", FP, b"c") != namespace_key("a", FP, b"bc")


def test_str_and_bytes_forms_agree():
    assert namespace_key("m", FP.hex()) == namespace_key("m", FP)
    assert namespace_key("m", FP, "tenant") == namespace_key("m", FP, b"tenant")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_id": "", "layout_fingerprint": FP}, "model_id"),
        ({"model_id": 3, "layout_fingerprint": FP}, "model_id"),
        ({"model_id": "m", "layout_fingerprint": "not hex"}, "layout_fingerprint"),
        ({"model_id": "m", "layout_fingerprint": b""}, "layout_fingerprint"),
        ({"model_id": "m", "layout_fingerprint": 7}, "layout_fingerprint"),
        ({"model_id": "m", "layout_fingerprint": FP, "tenant_salt": 5}, "tenant_salt"),
    ],
)
def test_namespace_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        namespace_key(**kwargs)


# ---------------------------------------------------------------------------------------------
# Accepted inputs


def input_forms(tokens):
    arr = np.asarray(tokens)
    return {
        "list": list(tokens),
        "tuple": tuple(tokens),
        "numpy_int32": arr.astype(np.int32),
        "numpy_int64": arr.astype(np.int64),
        "numpy_uint32": arr.astype(np.uint32),
        "numpy_big_endian": arr.astype(">i4"),
        "numpy_strided": np.repeat(arr.astype(np.int64), 2)[::2],
        "torch_int32": torch.tensor(tokens, dtype=torch.int32),
        "torch_int64": torch.tensor(tokens, dtype=torch.int64),
        "torch_strided": torch.tensor(tokens, dtype=torch.int64).repeat_interleave(2)[::2],
        "list_of_numpy_scalars": list(arr.astype(np.int64)),
    }


@pytest.mark.parametrize("form", list(input_forms([1, 2, 3])))
def test_all_input_types_give_equal_keys(form):
    tokens = random_tokens(700, seed=7)
    expected = reference_chunk_keys(tokens, 128, NS)
    assert chunk_keys(input_forms(tokens)[form], 128, NS) == expected


def test_range_input():
    assert chunk_keys(range(512), 256, NS) == chunk_keys(list(range(512)), 256, NS)


def test_small_integer_dtypes():
    tokens = list(range(100, 164))
    expected = chunk_keys(tokens, 32, NS)
    assert chunk_keys(np.array(tokens, dtype=np.uint8), 32, NS) == expected
    assert chunk_keys(torch.tensor(tokens, dtype=torch.int16), 32, NS) == expected


def test_token_bytes_is_int32_little_endian():
    out = token_bytes([1, 256, MAX_TOKEN_ID])
    assert out.dtype == np.dtype("<i4") and out.flags.c_contiguous
    assert out.tobytes() == struct.pack("<3i", 1, 256, MAX_TOKEN_ID)


def test_input_is_not_modified():
    arr = np.arange(512, dtype=np.int64)
    chunk_keys(arr, 256, NS)
    assert np.array_equal(arr, np.arange(512))


@pytest.mark.gpu
def test_cuda_tensor_input(gpu):
    tokens = random_tokens(512)
    t = torch.tensor(tokens, dtype=torch.int64, device=gpu)
    assert chunk_keys(t, 256, NS) == reference_chunk_keys(tokens, 256, NS)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ([1.0, 2.0], "float"),
        ([1, 2.5, 3], r"tokens\[1\] = 2.5"),
        ([1, True, 3], r"tokens\[1\] = True is a bool"),
        ([1, "7"], r"tokens\[1\] = '7'"),
        (np.array([1.0, 2.0]), "float64"),
        (np.array([True, False]), "bool"),
        (np.array(["1", "2"]), "dtype"),
        (torch.tensor([1.0, 2.0]), "float32"),
        (torch.tensor([1, 2], dtype=torch.bfloat16), "bfloat16"),
        (torch.tensor([True, False]), "bool"),
        (np.zeros((2, 256), dtype=np.int32), r"1-D.*\(2, 256\)"),
        (torch.zeros(2, 256, dtype=torch.int64), r"1-D.*\(2, 256\)"),
        (np.int32(5), "got int32"),
        ([[1, 2], [3, 4]], "1-D"),
        ([0, 5, -1, 2], r"tokens\[2\] = -1"),
        (np.array([0, 5, 9, -3]), r"tokens\[3\] = -3"),
        (torch.tensor([0, -7], dtype=torch.int32), r"tokens\[1\] = -7"),
        ([3, 2**31], r"tokens\[1\] = 2147483648"),
        ([3, 2**70], r"tokens\[1\] = 1180591620717411303424"),
        (np.array([1, 2**31], dtype=np.int64), r"tokens\[1\] = 2147483648"),
        (np.array([1, 2**32 - 1], dtype=np.uint32), r"tokens\[1\] = 4294967295"),
        ("hello", "str"),
        (b"\x01\x02", "bytes"),
        ({1, 2}, "set"),
        (iter([1, 2]), "tokens must be"),
    ],
)
def test_bad_tokens_raise_naming_the_problem(tokens, match):
    with pytest.raises(ValueError, match=match):
        chunk_keys(tokens, 1, NS)


def test_bad_id_in_partial_tail_still_raises():
    with pytest.raises(ValueError, match=r"tokens\[300\] = -1"):
        chunk_keys(list(range(300)) + [-1], 256, NS)


@pytest.mark.parametrize("chunk_tokens", [0, -256, 1.5, 256.0, "256", None, True])
def test_bad_chunk_tokens(chunk_tokens):
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_keys([1, 2, 3], chunk_tokens, NS)


def test_numpy_int_chunk_tokens_accepted():
    assert chunk_keys(list(range(512)), np.int64(256), NS) == chunk_keys(range(512), 256, NS)


@pytest.mark.parametrize("namespace", [b"", b"x" * 15, b"x" * 17, "x" * 16, None, 16])
def test_bad_namespace(namespace):
    with pytest.raises(ValueError, match="namespace"):
        chunk_keys([1, 2, 3], 1, namespace)


def test_bytearray_namespace_accepted():
    assert chunk_keys([1, 2], 1, bytearray(NS)) == chunk_keys([1, 2], 1, NS)


# ---------------------------------------------------------------------------------------------
# ChunkKeyer


def test_chunk_keyer_bundles_namespace_and_chunk_size():
    keyer = ChunkKeyer("test-model", FP, chunk_tokens=64, tenant_salt="t")
    tokens = random_tokens(300)
    assert keyer.namespace == namespace_key("test-model", FP, "t")
    assert keyer.keys(tokens) == chunk_keys(tokens, 64, keyer.namespace)
    assert keyer.num_full_chunks(300) == len(keyer.keys(tokens)) == 4
    assert (keyer.model_id, keyer.layout_fingerprint, keyer.chunk_tokens) == (
        "test-model",
        FP,
        64,
    )


def test_chunk_keyer_repr_hides_salt():
    assert "secret" not in repr(ChunkKeyer("m", FP, tenant_salt="secret"))


def test_chunk_keyer_from_layout():
    class FakeLayout:
        key_fingerprint = FP
        chunk_tokens = 128

    keyer = ChunkKeyer.from_layout("m", FakeLayout())
    assert keyer.chunk_tokens == 128
    assert keyer.namespace == namespace_key("m", FP)


def test_chunk_keyer_rejects_bad_chunk_tokens():
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkKeyer("m", FP, chunk_tokens=0)


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=200, deadline=None, database=None)
@given(
    tokens=st.lists(st.integers(0, MAX_TOKEN_ID), max_size=300),
    chunk_tokens=st.integers(1, 64),
    salt=st.none() | st.binary(max_size=8),
)
def test_property_agrees_with_reference(tokens, chunk_tokens, salt):
    ns = namespace_key("prop-model", FP, salt)
    assert ns == reference_namespace_key("prop-model", FP, salt)
    keys = chunk_keys(tokens, chunk_tokens, ns)
    assert keys == reference_chunk_keys(tokens, chunk_tokens, ns)
    assert len(keys) == len(tokens) // chunk_tokens
    assert chunk_keys(np.asarray(tokens, dtype=np.int64), chunk_tokens, ns) == keys


@settings(max_examples=200, deadline=None, database=None)
@given(
    a=st.lists(st.integers(0, 1000), min_size=1, max_size=200),
    b=st.lists(st.integers(0, 1000), min_size=1, max_size=200),
    chunk_tokens=st.integers(1, 32),
)
def test_property_keys_equal_exactly_on_the_common_prefix(a, b, chunk_tokens):
    ka, kb = chunk_keys(a, chunk_tokens, NS), chunk_keys(b, chunk_tokens, NS)
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shared_chunks = common // chunk_tokens
    assert ka[:shared_chunks] == kb[:shared_chunks]
    # Past the shared prefix no key collides (a 128-bit collision would be a finding).
    assert not set(ka[shared_chunks:]) & set(kb[shared_chunks:])


@pytest.mark.parametrize("bad", [[-1, 2], [2**31], [1.5], "tokens", np.zeros((2, 2), dtype=np.int64)])
def test_bad_tokens_raise_kvtiers_typed_error(bad):
    """Bad input is InvalidArgumentError (a ValueError), the class every kvtier call raises for
    bad arguments, so a caller catches one class."""
    from kvtier.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        chunk_keys(bad, 1, b"ns")
