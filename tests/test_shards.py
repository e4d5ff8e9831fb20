"""Sharded safetensors: the writer's shards and index, the reader's checks of an index against its files."""

import json

import pytest
import torch

from sparsefx.shards import ShardError, ShardWriter, TensorStore, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(37, 11 + i, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(7)}


def test_writer_shards_at_the_size_limit_and_reader_gets_every_tensor_back(tmp_path):
    tensors = _tensors()
    w = ShardWriter(tmp_path, "model", max_shard_size=4000)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and files == shards + ["model.safetensors.index.json"]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # no shard holds more than the limit unless a single tensor is larger
    for f in shards:
        assert (tmp_path / f).stat().st_size < 4000 + 1000
    store = TensorStore(tmp_path)
    assert sorted(store.keys()) == sorted(tensors)
    got = store.load(list(tensors))
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    as_f32 = store.load(["t1"], dtype=torch.float32)["t1"]
    assert as_f32.dtype == torch.float32 and torch.equal(as_f32, tensors["t1"].float())
    assert not list(tmp_path.glob(".model-part*"))   # temporary names are gone


def _mixed():
    g = torch.Generator().manual_seed(1)
    return {"a.u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),    # odd byte count first
            "b.f32": torch.randn(5, 7, generator=g),
            "c.bool": torch.rand(3, generator=g) > 0.5,
            "d.f64": torch.randn(3, generator=g, dtype=torch.float64),
            "e.bf16": torch.randn(9, 3, generator=g).bfloat16(),
            "f.i64": torch.arange(5),
            "g.f16": torch.randn(7, generator=g).half(),
            "h.scalar": torch.tensor(2.5),
            "i.empty": torch.zeros(0, 4),
            "j.i8": torch.randint(-8, 8, (2, 3), generator=g, dtype=torch.int8),
            "k.noncontig": torch.randn(6, 4, generator=g).t()}


def test_streamed_shard_is_safetensors_with_every_dtype_aligned(tmp_path):
    """The writer's own file format: safetensors reads every tensor back exactly, each at an offset that is a
    multiple of its element size (as save_file lays them out), whatever order they came in."""
    from safetensors import safe_open

    tensors = _mixed()
    w = ShardWriter(tmp_path, "model")
    for k, v in tensors.items():
        w.add(k, v)
    assert w.finish() == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    for k, v in tensors.items():
        begin, end = header[k]["data_offsets"]
        assert begin % v.element_size() == 0 and end - begin == v.numel() * v.element_size(), k
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]      # no spill file left


def test_writer_holds_no_tensor_it_was_given(tmp_path):
    import weakref

    w = ShardWriter(tmp_path, "model", max_shard_size=10**9)
    t = torch.randn(256, 256)
    ref = weakref.ref(t)
    w.add("t", t)
    del t
    assert ref() is None                           # written out, not kept until the shard closes
    assert w.pending_bytes == 256 * 256 * 4 and w.finish() == ["model.safetensors"]


def test_abort_leaves_no_spill_or_part_file(tmp_path):
    w = ShardWriter(tmp_path, "model", max_shard_size=1000)
    for k, v in _tensors().items():
        w.add(k, v)
    assert any(p.suffix == ".spill" for p in tmp_path.iterdir()) and w.parts
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_one_shard_is_a_plain_file_without_index(tmp_path):
    w = ShardWriter(tmp_path, "compressed")
    w.add("a", torch.arange(5))
    assert w.finish() == ["compressed.safetensors"]
    assert not (tmp_path / "compressed.safetensors.index.json").exists()
    assert TensorStore(tmp_path, "compressed").load(["a"])["a"].tolist() == [0, 1, 2, 3, 4]


def test_transformers_loads_the_sharded_layout(tmp_path):
    """What ShardWriter writes is the HF layout: from_pretrained reads it (and the dtype it holds)."""
    from transformers import AutoModelForCausalLM

    from sparsefx.models import tiny_model

    model = tiny_model("llama").to(torch.bfloat16)
    w = ShardWriter(tmp_path, "model", max_shard_size=50_000)
    for k, v in model.state_dict().items():
        w.add(k, v)
    w.finish()
    model.config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.fixture
def sharded(tmp_path):
    w = ShardWriter(tmp_path, "model", max_shard_size=3000)
    for k, v in _tensors().items():
        w.add(k, v)
    w.finish()
    return tmp_path


def test_missing_shard_is_named(sharded):
    second = sorted(sharded.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(ShardError, match=rf"{second.name}.*missing"):
        TensorStore(sharded)


def test_index_that_maps_a_tensor_to_the_wrong_shard_is_refused(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = index["weight_map"]["t0"]
    other = next(f for f in index["weight_map"].values() if f != first)
    index["weight_map"]["t0"] = other
    path.write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"'t0'.*does not hold it"):
        TensorStore(sharded)


def test_index_that_leaves_out_a_tensor_is_refused(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"]["t3"]
    path.write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"does not list tensor 't3'"):
        TensorStore(sharded)


def test_corrupt_index_and_lost_index_are_named(sharded):
    path = sharded / "model.safetensors.index.json"
    path.write_text("{not json")
    with pytest.raises(ShardError, match="not a valid safetensors index"):
        TensorStore(sharded)
    path.unlink()
    with pytest.raises(ShardError, match="the index is missing"):
        TensorStore(sharded)


def test_asking_for_an_absent_tensor_names_it(sharded):
    with pytest.raises(ShardError, match="no tensor 'nope'"):
        TensorStore(sharded).load(["t0", "nope"])


def test_iter_files_checks_each_digest_in_the_same_read(sharded):
    import hashlib

    store = TensorStore(sharded)
    digests = {f: hashlib.sha256((sharded / f).read_bytes()).hexdigest() for f in store.files}
    assert sum(len(t) for _, t in store.iter_files(digests)) == 7
    data = bytearray((sharded / store.files[1]).read_bytes())
    data[-3] ^= 0xFF
    (sharded / store.files[1]).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{store.files[1]} is corrupt"):
        list(store.iter_files(digests))


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gb", 1_500_000_000),
                                        ("1000", 1000), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "2XB", "-1GB", "0", "GB", True])
def test_parse_size_refuses_with_the_field_named(bad):
    with pytest.raises(ValueError, match="--max-shard-size: expected a positive size"):
        parse_size(bad, "--max-shard-size")
