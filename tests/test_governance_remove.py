"""Opt-out removal: exactly the listed repositories' documents go (checked against the
provenance), everything else is byte-identical and in order, megatron-core reads the result,
and the search index rebuilt from it no longer finds the removed code."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset, write_documents
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.provenance import open_provenance, provenance_path
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.governance import search


@pytest.fixture
def dataset(tmp_path, starcoder2_tokenizer_path):
    tok = load_tokenizer(starcoder2_tokenizer_path)
    for r in range(8):
        for k in range(1 + r % 3):
            p = tmp_path / "repos" / f"owner{r % 3}-repo{r}" / f"f{k}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"def f{r}_{k}():\n    return {r * 10 + k}  # repo{r} secret_{r}\n")
    preprocess(str(tmp_path / "d"), tok, inputs=[str(tmp_path / "repos")], append_eod=True, progress=False)
    # and JSON lines of one-file documents naming their repository (The Stack's layout)
    with open(tmp_path / "x.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"x = {i}  # secret_j{i}\n", "repo_name": f"js/r{i % 2}", "path": "a.js"}) + "\n")
    preprocess(str(tmp_path / "j"), tok, inputs=[str(tmp_path / "x.jsonl")], append_eod=True, progress=False)
    return tmp_path, tok


def test_remove_exactly_the_listed_repositories(dataset, capsys):
    tmp, tok = dataset
    prefix = str(tmp / "d_text_document")
    ds, prov = IndexedDataset(prefix), open_provenance(prefix)
    repos = tmp / "optout.txt"
    repos.write_text("# owners who opted out\nowner1-repo1\n\nowner2-repo5  \nnobody/else\n")
    assert cli_main(["remove", "--data-path", prefix, "--repos", str(repos), "--output-prefix", str(tmp / "clean"),
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["removed"] == {"owner1-repo1": 1, "owner2-repo5": 1} and report["not_found"] == ["nobody/else"]
    out = IndexedDataset(tmp / "clean")
    out_prov = open_provenance(tmp / "clean", out.num_documents)
    keep = [d for d in range(ds.num_documents) if prov[d].repository not in ("owner1-repo1", "owner2-repo5")]
    assert out.num_documents == len(keep) == ds.num_documents - 2
    for i, d in enumerate(keep):
        assert np.array_equal(out.document(i), ds.document(d))
        assert out_prov.raw(i) == prov.raw(d)
    assert report["tokens_removed"] == ds.num_tokens - out.num_tokens
    # megatron-core reads the result, document for document
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    m = MIndexed(str(tmp / "clean"))
    assert len(m) == len(keep) and all(np.array_equal(m[i], out.document(i)) for i in range(len(keep)))
    # rebuilt, the search index no longer finds the removed repositories' code
    before, after = tmp / "s0", tmp / "s1"
    search.build([prefix], before)
    search.build([str(tmp / "clean")], after)
    for marker, gone in ((" secret_1", True), (" secret_5", True), (" secret_2", False)):
        ids = tok.encode(marker)
        assert search.SearchIndex(before).count_ids(ids) > 0
        assert (search.SearchIndex(after).count_ids(ids) == 0) == gone

    # one-file documents: every file of the listed repository goes
    jp = str(tmp / "j_text_document")
    (tmp / "js.txt").write_text("js/r1\n")
    assert cli_main(["remove", "--data-path", jp, "--repos", str(tmp / "js.txt"), "--output-prefix", str(tmp / "jc")]) == 0
    assert [o.repository for o in open_provenance(tmp / "jc")] == ["js/r0"] * 3


def test_remove_needs_provenance_and_a_list(dataset, capsys):
    tmp, _ = dataset
    write_documents(tmp / "meg_text_document", [[1, 2], [3]], dtype=np.uint16)
    (tmp / "r.txt").write_text("a\n")

    def one_line_error(argv, needle):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err

    one_line_error(["remove", "--data-path", str(tmp / "meg_text_document"), "--repos", str(tmp / "r.txt"),
                    "--output-prefix", str(tmp / "o")], str(provenance_path(tmp / "meg_text_document")))
    assert not (tmp / "o.bin").exists() and not (tmp / "o.idx").exists()
    one_line_error(["remove", "--data-path", str(tmp / "d_text_document"), "--repos", str(tmp / "missing.txt"),
                    "--output-prefix", str(tmp / "o")], "missing.txt")
    one_line_error(["remove", "--data-path", str(tmp / "d_text_document"), "--repos", str(tmp / "r.txt"),
                    "--output-prefix", str(tmp / "d_text_document")], "--output-prefix")
    assert sorted(p.name for p in tmp.iterdir() if ".tmp-" in p.name) == []
