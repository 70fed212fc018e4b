"""Codec: the documented byte layout written out by hand, and every decode error path with its exact message.

The oracle is the layout in ``shards/format/codec.py``'s docstring, re-implemented here with ``struct`` and literal
numbers (format 1.0, field bits in schema order), so that a change to the bytes on disk cannot go unnoticed.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from shards.format.codec import CodecError, check_decoded, decode, encode
from shards.format.schema import AtomGraph, SchemaError, SchemaVersionError

HEAD = "<4sHHIIII"  # magic, major, minor, meta_len, n_atoms, n_bonds, field_mask
HEAD_SIZE = 24
MAJOR, MINOR = 1, 0
# bit of each array field in the field mask (schema order)
Z_BIT, POS_BIT, CELL_BIT, PBC_BIT, FORCES_BIT, BONDS_BIT, ORDER_BIT = 0, 1, 2, 3, 4, 5, 6
META = {"key": "m-1", "domain": "molecule", "source": "test", "source_file": "m.sdf", "index": 0}


def _pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def _sample(meta: bytes, n: int, mask: int, arrays: bytes = b"", *, magic: bytes = b"SCDG", major: int = MAJOR,
            minor: int = MINOR, n_bonds: int = 0, meta_len: int | None = None) -> bytes:
    """One sample as the docstring lays it out: header | meta | pad to 8 | arrays (each already padded)."""
    head = struct.pack(HEAD, magic, major, minor, len(meta) if meta_len is None else meta_len, n, n_bonds, mask)
    return _pad8(head + meta) + arrays


def _water() -> AtomGraph:
    return AtomGraph(key="m-1", domain="molecule", source="test", source_file="m.sdf", index=0,
                     atomic_numbers=np.array([8, 1, 1]), positions=np.arange(9.0).reshape(3, 3),
                     cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))


def _water_arrays() -> bytes:
    z = _pad8(bytes([8, 1, 1]))
    pos = _pad8(np.arange(9, dtype="<f4").tobytes())
    return z + pos


def _minimal(**meta_extra) -> bytes:
    meta = json.dumps(META | meta_extra, separators=(",", ":")).encode()
    return _sample(meta, 3, 1 << Z_BIT | 1 << POS_BIT, _water_arrays())


def test_encoded_bytes_are_the_documented_layout():
    got = encode(_water())
    meta = b'{"key":"m-1","domain":"molecule","source":"test","source_file":"m.sdf","index":0}'
    assert got == _sample(meta, 3, 0b11, _water_arrays())
    assert len(got) % 8 == 0


def test_header_json_is_compact_ascii_with_sorted_maps():
    g = _water().replace(source_file="é.sdf", properties={"zeta": 2.0, "alpha": 1.5},
                         property_units={"zeta": "eV", "alpha": "Ha"}, energy=-1.25)
    got = encode(g)
    meta_len = struct.unpack_from(HEAD, got)[3]
    head = got[HEAD_SIZE:HEAD_SIZE + meta_len]
    assert head == (b'{"key":"m-1","domain":"molecule","source":"test","source_file":"\\u00e9.sdf","index":0,'
                    b'"energy":-1.25,"properties":{"alpha":1.5,"zeta":2.0},'
                    b'"property_units":{"alpha":"Ha","zeta":"eV"}}')
    # the padding after the header is zeros, and the arrays start at the next multiple of 8
    start = HEAD_SIZE + meta_len
    arrays_at = start + (-start % 8)
    assert got[start:arrays_at] == b"\0" * (arrays_at - start)
    assert got[arrays_at:] == _water_arrays()
    assert decode(got).source_file == "é.sdf"


def test_same_graph_same_bytes_whatever_the_map_insertion_order():
    a = _water().replace(properties={"b": 1.0, "a": 2.0}, property_units={"b": "eV", "a": "eV"})
    b = _water().replace(properties={"a": 2.0, "b": 1.0}, property_units={"a": "eV", "b": "eV"})
    assert encode(a) == encode(b)


def test_cell_without_pbc_is_kept_and_non_periodic_omits_cell_and_pbc():
    cell = np.diag([5.0, 6.0, 7.0])
    g = _water().replace(cell=cell)  # a box that is not periodic (e.g. a molecule in a vacuum box)
    got = encode(g)
    mask = struct.unpack_from(HEAD, got)[6]
    assert mask == 1 << Z_BIT | 1 << POS_BIT | 1 << CELL_BIT | 1 << PBC_BIT
    back = decode(got)
    assert np.array_equal(back.cell, cell) and not back.pbc.any()
    assert struct.unpack_from(HEAD, encode(_water()))[6] == 1 << Z_BIT | 1 << POS_BIT
    half = _water().replace(cell=cell, pbc=np.array([True, False, False]))
    back = decode(encode(half))
    assert back.pbc.tolist() == [True, False, False] and np.array_equal(back.cell, cell)


def test_encode_refuses_non_finite_header_values():
    g = decode(encode(_water()), validate=False)
    g.__dict__["energy"] = float("nan")  # an unvalidated graph must still not produce non-standard JSON
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode(g)


def test_short_buffers_and_a_bare_header():
    with pytest.raises(CodecError) as err:
        decode(b"SCDG" + b"\0" * 19)
    assert str(err.value) == "sample of 23 bytes is shorter than its header"
    bare = struct.pack(HEAD, b"SCDG", MAJOR, MINOR, 0, 0, 0, 0)
    assert len(bare) == HEAD_SIZE
    with pytest.raises(CodecError) as err:  # exactly a header: not "shorter", but its empty JSON is unreadable
        decode(bare)
    assert str(err.value).startswith("unreadable sample header: ")


def test_bad_magic_and_major_version_messages():
    good = _minimal()
    with pytest.raises(CodecError) as err:
        decode(b"XXXX" + good[4:])
    assert str(err.value) == "bad magic b'XXXX': not an SCD sample"
    with pytest.raises(SchemaVersionError) as verr:
        decode(good[:4] + struct.pack("<HH", 2, 3) + good[8:])
    assert str(verr.value) == "sample schema version 2.3 is not supported (this reader knows major 1)"


def test_header_length_bounds():
    limit = 1 << 20
    meta = json.dumps(META, separators=(",", ":")).encode()
    at_limit = meta + b" " * (limit - len(meta))  # JSON allows trailing blanks: a header of exactly 1 MiB
    g = decode(_sample(at_limit, 3, 0b11, _water_arrays()))
    assert g.key == "m-1" and g.n_atoms == 3
    over = at_limit + b" "
    buf = _sample(over, 3, 0b11, _water_arrays())
    with pytest.raises(CodecError) as err:
        decode(buf)
    assert str(err.value) == f"header length {limit + 1} is out of bounds for a {len(buf)}-byte sample"
    # a small header that claims more bytes than the sample holds
    buf = _sample(meta, 3, 0b11, meta_len=10_000)
    with pytest.raises(CodecError) as err:
        decode(buf)
    assert str(err.value) == f"header length 10000 is out of bounds for a {len(buf)}-byte sample"
    # a header that ends exactly at the end of the buffer is in bounds
    exact = struct.pack(HEAD, b"SCDG", MAJOR, MINOR, len(meta), 0, 0, 0) + meta
    assert decode(exact, validate=False).key == "m-1"


def test_atom_limit_is_inclusive():
    buf = _minimal()
    assert decode(buf, max_atoms=3).n_atoms == 3
    with pytest.raises(CodecError) as err:
        decode(buf, max_atoms=2)
    assert str(err.value) == "3 atoms exceeds the limit of 2"


def test_header_must_be_a_json_object():
    for meta, prefix in ((b"[1, 2]", "sample header is not a JSON object"), (b"{nope", "unreadable sample header: ")):
        with pytest.raises(CodecError) as err:
            decode(_sample(meta, 3, 0b11, _water_arrays()))
        assert str(err.value).startswith(prefix)


def test_unknown_header_fields_refused_at_this_minor_and_dropped_from_a_newer_one():
    meta = json.dumps(META | {"zz": 1, "aa": 2}, separators=(",", ":")).encode()
    for minor in (MINOR, MINOR - 1) if MINOR else (MINOR,):
        with pytest.raises(CodecError) as err:
            decode(_sample(meta, 3, 0b11, _water_arrays(), minor=minor))
        assert str(err.value) == "unknown fields ['aa', 'zz'] in sample header"
    g = decode(_sample(meta, 3, 0b11, _water_arrays(), minor=MINOR + 1))
    assert "zz" not in g.__dict__ and "aa" not in g.__dict__
    assert encode(g) == encode(_water())


def test_array_overrun_and_unknown_mask_bits():
    buf = _minimal()
    with pytest.raises(CodecError) as err:
        decode(buf[:-5])  # 4 bytes of trailing padding plus one byte of positions
    meta_end = HEAD_SIZE + len(json.dumps(META, separators=(",", ":")))
    pos_at = meta_end + (-meta_end % 8) + 8
    assert str(err.value) == f"array 'positions' (36 bytes at {pos_at}) overruns the {len(buf) - 5}-byte sample"
    meta = json.dumps(META, separators=(",", ":")).encode()
    with pytest.raises(CodecError) as err:
        decode(_sample(meta, 3, 0b11 | 1 << 30, _water_arrays()))
    assert str(err.value) == "field mask 0x40000003 names unknown array fields"
    assert decode(buf[:-4]).positions.tolist() == np.arange(9.0).reshape(3, 3).tolist()  # last padding optional


def test_bonds_are_read_with_the_bond_count():
    g = _water().replace(bonds=np.array([[0, 1], [0, 2]]), bond_order=[1.0, 1.0])
    got = encode(g)
    assert struct.unpack_from(HEAD, got)[5] == 2
    bonds = np.array([[0, 1], [0, 2]], "<i4").tobytes()
    order = _pad8(np.array([1.0, 1.0], "<f4").tobytes())
    assert got.endswith(_water_arrays() + bonds + order)
    assert decode(got).bonds.tolist() == [[0, 1], [0, 2]]


def test_decoded_sample_missing_a_required_array_names_key_and_field():
    meta = json.dumps(META, separators=(",", ":")).encode()
    buf = _sample(meta, 3, 1 << Z_BIT, _pad8(bytes([8, 1, 1])))  # no positions
    with pytest.raises(SchemaError) as err:
        decode(buf)
    assert (err.value.key, err.value.field, err.value.reason) == ("m-1", "positions", "is required")
    assert str(err.value) == "sample 'm-1': field 'positions': is required"
    g = decode(buf, validate=False)
    assert g.positions is None


def test_decoded_graph_checks_key_and_the_given_atom_limit():
    g = decode(_minimal(key="bad.key"), validate=False)
    with pytest.raises(SchemaError) as err:
        check_decoded(g)
    assert err.value.field == "key"
    with pytest.raises(SchemaError) as err:
        decode(_minimal(key="bad.key"))
    assert err.value.field == "key"
    ok = decode(_minimal())
    check_decoded(ok, 3)
    with pytest.raises(SchemaError) as err:
        check_decoded(ok, 2)
    assert err.value.reason == "3 atoms exceeds the limit of 2"
