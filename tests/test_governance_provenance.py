"""The provenance sidecar: preprocess writes it, merge carries it, inspect shows it; spans are
checked against the input files themselves and the tokenizer's own decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset, write_documents
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.provenance import Provenance, open_provenance, provenance_path
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.errors import DataError

REPOS = {
    "alpha": {"a.py": "def a():\n    return 1\n", "pkg/b.py": "import os\r\n\r\nX  =  2\n", "c.md": "# t\n\tx\n"},
    "beta": {"main.py": "print('héllo wörld')\n"},
    "gamma": {"x.py": "x = 1\n", "y.py": "y = 2\n", "z.py": "class Z:\n    pass\n"},
}


def make_repos(root: Path, repos=REPOS) -> Path:
    for name, files in repos.items():
        for rel, text in files.items():
            p = root / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(text.encode("utf-8"))
    return root


@pytest.fixture
def tok(starcoder2_tokenizer_path):
    return load_tokenizer(starcoder2_tokenizer_path)


def test_repository_provenance_spans(tmp_path, tok):
    corpus = make_repos(tmp_path / "repos")
    preprocess(str(tmp_path / "out"), tok, inputs=[str(corpus)], append_eod=True, progress=False)
    prefix = tmp_path / "out_text_document"
    ds = IndexedDataset(prefix)
    prov = open_provenance(prefix, ds.num_documents)
    assert prov is not None and len(prov) == ds.num_documents == 3
    seen = set()
    for d in range(ds.num_documents):
        o = prov[d]
        assert o.source == str(corpus) and o.repository in REPOS
        ids = ds.document(d)
        text = tok.decode(ids[:-1].tolist())
        assert sorted(f.path for f in o.files) == sorted(REPOS[o.repository])
        for f in o.files:
            code = REPOS[o.repository][f.path]
            assert text[f.char_start:f.char_end] == code  # the file's own bytes, CRLF included
            chunk = tok.decode(ids[f.token_start:f.token_end].tolist())
            assert chunk.endswith(code) and chunk in (code, f.path + "\n" + code)
            assert ids[f.token_start - 1] == tok.special_ids["file_sep"]
        seen.add(o.repository)
    assert seen == set(REPOS)


def test_jsonl_provenance_lines_and_megatron_style_inputs(tmp_path, tok):
    inp = tmp_path / "in.jsonl"
    rows = [{"text": "a = 1\n", "repo_name": "o/r", "path": "a.py"}, {"text": "b = 2\n"},
            {"text": "c = 3\n", "repo_name": "o/s", "path": "src/c.py"}]
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    preprocess(str(tmp_path / "j"), tok, inputs=[str(inp)], append_eod=True, progress=False)
    prov = Provenance(provenance_path(tmp_path / "j_text_document"))
    recs = [prov.record(d) for d in range(3)]
    assert [r["line"] for r in recs] == [1, 2, 3] and all(r["source"] == str(inp) for r in recs)
    assert prov[0].repository == "o/r" and prov[0].files[0].path == "a.py"
    assert prov[1].repository is None and prov[1].files == []
    ds = IndexedDataset(tmp_path / "j_text_document")
    assert (prov[2].files[0].token_start, prov[2].files[0].token_end) == (0, len(ds.document(2)) - 1)

    # repository context from JSON lines: one document per repository, first line recorded
    inp2 = tmp_path / "rc.jsonl"
    rows2 = [{"content": "x = 1\n", "repo_name": "r1", "path": "x.py"},
             {"content": "y = 2\n", "repo_name": "r1", "path": "y.py"},
             {"content": "z = 3\n", "repo_name": "r2", "path": "z.py"}]
    inp2.write_text("\n".join(json.dumps(r) for r in rows2) + "\n")
    preprocess(str(tmp_path / "rc"), tok, inputs=[str(inp2)], repo_context=True, progress=False)
    p2 = open_provenance(tmp_path / "rc_text_document")
    assert [(o.repository, o.line, sorted(f.path for f in o.files)) for o in p2] == [
        ("r1", 1, ["x.py", "y.py"]), ("r2", 3, ["z.py"])]


def test_merge_carries_provenance_and_inspect_shows_it(tmp_path, tok, capsys):
    corpus = make_repos(tmp_path / "repos")
    preprocess(str(tmp_path / "a"), tok, inputs=[str(corpus)], append_eod=True, progress=False)
    # a dataset made without provenance (as Megatron's tool makes them)
    write_documents(tmp_path / "m_text_document", [[5, 6, 7], [8, 9]], dtype=np.uint16)
    a, m = str(tmp_path / "a_text_document"), str(tmp_path / "m_text_document")
    assert cli_main(["merge", "--inputs", a, m, a, "--output-prefix", str(tmp_path / "ab")]) == 0
    pa = open_provenance(a)
    pm = open_provenance(tmp_path / "ab", 8)
    assert pm is not None and len(pm) == 8
    assert [pm.raw(i) for i in range(3)] == [pa.raw(i) for i in range(3)] == [pm.raw(i) for i in range(5, 8)]
    assert pm.record(3) == {"source": m, "document": 0} and pm.record(4) == {"source": m, "document": 1}
    # merging datasets without provenance writes none (and removes a stale one)
    provenance_path(tmp_path / "mm").write_bytes(b"stale")
    assert cli_main(["merge", "--inputs", m, m, "--output-prefix", str(tmp_path / "mm")]) == 0
    assert not provenance_path(tmp_path / "mm").exists()

    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "ab"), "--decode", "1", "--decode", "3"]) == 0
    out = capsys.readouterr().out
    o1 = pa[1]
    assert f"repository: {o1.repository}" in out and f"file {o1.files[0].path}: chars" in out
    assert f"source: {m}" in out
    assert cli_main(["inspect", m, "--decode", "0"]) == 0
    assert "provenance: none" in capsys.readouterr().out


def test_broken_sidecar_is_one_line_naming_the_file(tmp_path, tok, capsys):
    corpus = make_repos(tmp_path / "repos")
    preprocess(str(tmp_path / "a"), tok, inputs=[str(corpus)], append_eod=True, progress=False)
    path = provenance_path(tmp_path / "a_text_document")
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(DataError, match="truncated provenance"):
        Provenance(path)
    assert cli_main(["inspect", str(tmp_path / "a_text_document"), "--decode", "0"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1
    path.write_bytes(data)
    with pytest.raises(DataError, match="records but its dataset has 5"):
        Provenance(path, expected_documents=5)
