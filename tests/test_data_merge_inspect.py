"""`megatron-sc2 merge` equals megatron-core's own merge byte for byte; `inspect` reports and
decodes; both refuse bad inputs with one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset, write_documents
from megatron_sc2.data.prep.merge import merge_datasets


def _make(prefix, seed, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 900, size=int(rng.integers(1, 60))).tolist() for _ in range(25)]
    write_documents(prefix, docs, dtype)
    return docs


def test_merge_equals_megatron_core(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed, IndexedDatasetBuilder
    docs = _make(tmp_path / "a", 0) + _make(tmp_path / "b", 1)
    assert cli_main(["merge", "--inputs", str(tmp_path / "a"), str(tmp_path / "b.idx"),
                     "--output-prefix", str(tmp_path / "ours")]) == 0
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for p in ("a", "b"):
        builder.add_index(str(tmp_path / p))
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    merged = IndexedDataset(tmp_path / "ours")
    assert [merged.document(i).tolist() for i in range(merged.num_documents)] == docs
    assert MIndexed(str(tmp_path / "ours")).sequence_lengths.tolist() == [len(d) for d in docs]


def test_merge_errors(tmp_path, capsys):
    _make(tmp_path / "a", 0)
    _make(tmp_path / "w", 1, dtype=np.int32)
    rc = cli_main(["merge", "--inputs", str(tmp_path / "a"), str(tmp_path / "w"), "--output-prefix", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "w.idx" in err[0] and "dtype" in err[0]
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob("m*tmp*"))
    (tmp_path / "c.bin").write_bytes(b"\x00" * 10)
    rc = cli_main(["merge", "--inputs", str(tmp_path / "a"), str(tmp_path / "c"), "--output-prefix", str(tmp_path / "m")])
    assert rc == 2 and "c.idx: missing" in capsys.readouterr().err
    with pytest.raises(Exception, match="also an input"):
        merge_datasets([str(tmp_path / "a")], str(tmp_path / "a"))


def test_inspect(tmp_path, capsys, starcoder2_tokenizer_path):
    from megatron_sc2.data.tokenizer import load_tokenizer

    tok = load_tokenizer(starcoder2_tokenizer_path)
    texts = ["def f():\n    return 1\n", "x = 2\n" * 50]
    write_documents(tmp_path / "d", [tok.encode(t) + [0] for t in texts], np.uint16)
    assert cli_main(["inspect", str(tmp_path / "d"), "--decode", "0", "--tokenizer-model",
                     str(starcoder2_tokenizer_path)]) == 0
    out = capsys.readouterr().out
    assert "documents: 2" in out and "length histogram" in out
    assert "def f():\n    return 1\n<|endoftext|>" in out
    assert cli_main(["inspect", str(tmp_path / "d"), "--decode", "7"]) == 2
    assert "documents 0..1" in capsys.readouterr().err
