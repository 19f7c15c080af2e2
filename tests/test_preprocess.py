"""Preprocessing: megatron-core reads what we write (and we read what it writes), inputs in
every format give the same bytes, repository documents, and every bad input of issues 2/5."""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset, IndexedWriter
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.prep.sources import FileFilters
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.errors import DataError

TEXTS = ["def f(x):\n    return x + 12\n", "print('héllo <NAME> wörld')\n", "import os\nos.getcwd()  # 7\n",
         "x =  12\n\n\n", "class A:\n\tpass\n", "def f(x):\n    return x + 12\n"]


@pytest.fixture
def tok(starcoder2_tokenizer_path):
    return load_tokenizer(starcoder2_tokenizer_path)


def _jsonl(path: Path, texts, key="text", extra=None) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            rec = {key: t, "id": i}
            if extra:
                rec.update(extra(i))
            f.write(json.dumps(rec) + "\n")
    return path


def _megatron_indexed(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    return MIndexed(str(prefix))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or p.suffix in (".bin", ".idx"))


def test_megatron_core_reads_our_output(tmp_path, tok, starcoder2_tokenizer_path):
    inp = _jsonl(tmp_path / "in.jsonl", TEXTS)
    rc = cli_main(["preprocess", "--input", str(inp), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-model", str(starcoder2_tokenizer_path), "--append-eod", "--no-progress"])
    assert rc == 0
    import tokenizers

    ref = tokenizers.Tokenizer.from_file(str(starcoder2_tokenizer_path))
    plain = tokenizers.Tokenizer.from_file(str(starcoder2_tokenizer_path))
    plain.encode_special_tokens = True  # tokenizers' own switch: special-token text stays text
    m = _megatron_indexed(tmp_path / "out_text_document")
    assert len(m) == len(TEXTS) and m.index.dtype == np.uint16
    assert list(m.document_indices) == list(range(len(TEXTS) + 1))
    for i, t in enumerate(TEXTS):
        assert m[i].tolist() == plain.encode(t, add_special_tokens=False).ids + [0]
    assert 34 not in m[1].tolist()  # literal <NAME> in code is text by default
    # Megatron's behaviour behind its flag: the literal becomes the special token, as in HF.
    for extra in ([], ["--no-fast-encoder"]):
        assert cli_main(["preprocess", "--input", str(inp), "--output-prefix", str(tmp_path / "meg"),
                         "--tokenizer-model", str(starcoder2_tokenizer_path), "--append-eod", "--no-progress",
                         "--parse-special-tokens", *extra]) == 0
        m = _megatron_indexed(tmp_path / "meg_text_document")
        for i, t in enumerate(TEXTS):
            assert m[i].tolist() == ref.encode(t, add_special_tokens=False).ids + [0]
        assert 34 in m[1].tolist()


def test_we_read_megatron_core_output(tmp_path):

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 70000, size=int(rng.integers(1, 50))) for _ in range(int(rng.integers(1, 4)))]
            for _ in range(30)]
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for doc in docs:
        b.add_document(np.concatenate(doc), [len(s) for s in doc])
    b.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    flat = [s for doc in docs for s in doc]
    assert len(ours) == len(flat) and ours.num_documents == len(docs)
    for i, s in enumerate(flat):
        assert np.array_equal(ours[i], s)
    for d, doc in enumerate(docs):
        assert np.array_equal(ours.document(d), np.concatenate(doc))
    # and our writer reproduces megatron-core's bytes for the same documents
    with IndexedWriter(tmp_path / "o", np.int32) as w:
        for doc in docs:
            w.add_document(np.concatenate(doc), [len(s) for s in doc])
        w.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"o{ext}").read_bytes() == (tmp_path / f"m{ext}").read_bytes()


def test_formats_and_workers_give_identical_bytes(tmp_path, tok):
    plain = _jsonl(tmp_path / "a.jsonl", TEXTS * 30)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    import zstandard

    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS * 30}), tmp_path / "a.parquet")
    outs = []
    for i, (src, workers) in enumerate([("a.jsonl", 1), ("a.jsonl", 3), ("a.jsonl.gz", 2),
                                        ("a.jsonl.zst", 1), ("a.parquet", 2)]):
        preprocess(str(tmp_path / f"o{i}"), tok, [str(tmp_path / src)], append_eod=True, workers=workers,
                   progress=False)
        outs.append([(tmp_path / f"o{i}_text_document{e}").read_bytes() for e in (".bin", ".idx")])
    assert all(o == outs[0] for o in outs[1:])
    # several inputs / a glob in one run: documents in order
    s = preprocess(str(tmp_path / "g"), tok, [str(tmp_path / "a.jsonl*")], append_eod=True, progress=False)
    assert s.documents == 3 * len(TEXTS) * 30 and s.read.input_files == 3


def test_repository_documents(tmp_path, tok):
    root = tmp_path / "repos"
    for r in range(40):
        for f in range(3):
            p = root / f"repo{r}" / "pkg" / f"m{f}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"# repo {r} file {f}\nx = {r * 10 + f}\n")
    (root / "repo0" / "blob.bin").write_bytes(b"\x00\x01\x02")
    (root / "loose.txt").write_text("not in a repository")
    s1 = preprocess(str(tmp_path / "r1"), tok, [str(root)], seed=5, progress=False)
    s2 = preprocess(str(tmp_path / "r2"), tok, [str(root)], seed=5, workers=2, progress=False)
    assert s1.documents == 40 and s1.read.binary_files == 1 and s1.read.loose_files == 1
    assert (tmp_path / "r1_text_document.bin").read_bytes() == (tmp_path / "r2_text_document.bin").read_bytes()
    ds = IndexedDataset(tmp_path / "r1_text_document")
    with_meta = 0
    for d in range(ds.num_documents):
        ids = ds.document(d).tolist()
        assert ids[-1] == tok.eod and ids.count(tok.eod) == 1
        text = tok.decode(ids[:-1])
        files = text.split("<file_sep>")
        if text.startswith("<repo_name>"):
            with_meta += 1
            name = files[0][len("<repo_name>"):]
            bodies = [f.split("\n", 1) for f in files[1:]]
            assert sorted(p for p, _ in bodies) == [f"pkg/m{i}.py" for i in range(3)]
            bodies = [b for _, b in bodies]
        else:
            assert files[0] == ""
            bodies = files[1:]
            name = "repo" + bodies[0].split()[2]
        r = int(name[4:])
        assert sorted(bodies) == sorted(f"# repo {r} file {f}\nx = {r * 10 + f}\n" for f in range(3))
    assert 10 <= with_meta <= 30  # probability 0.5 over 40 repositories
    s3 = preprocess(str(tmp_path / "r3"), tok, [str(root)], seed=6, progress=False)
    assert (tmp_path / "r3_text_document.bin").read_bytes() != (tmp_path / "r1_text_document.bin").read_bytes()
    assert s3.documents == 40


def test_repo_context_jsonl_and_filters(tmp_path, tok):
    texts = ["a = 1\n", "b = 2\n", "a = 1\n", "x" * 300 + "\n", "$$$$ ## !!\n", "c = 3\n"]
    inp = _jsonl(tmp_path / "r.jsonl", texts, key="content",
                 extra=lambda i: {"repo_name": f"org/r{i // 3}", "path": f"f{i}.py"})
    f = FileFilters(max_line_length=200, min_alphanum_fraction=0.25, dedup=True)
    s = preprocess(str(tmp_path / "o"), tok, [str(inp)], repo_context=True, filters=f, progress=False)
    assert s.documents == 2
    assert (s.read.duplicates, s.read.filtered_max_line_length, s.read.filtered_alphanum_fraction) == (1, 1, 1)
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert "org/r0" in tok.decode(ds.document(0).tolist()) or tok.decode(ds.document(0).tolist()).startswith("<file_sep>")
    # The Stack v2 parquet columns: files of one repository become one document, like JSONL
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"repo_name": [f"org/r{i // 3}" for i in range(6)],
                             "path": [f"f{i}.py" for i in range(6)], "content": texts}), tmp_path / "s.parquet")
    s = preprocess(str(tmp_path / "q"), tok, [str(tmp_path / "s.parquet")],
                   filters=FileFilters(max_line_length=200, min_alphanum_fraction=0.25, dedup=True), progress=False)
    assert s.documents == 2 and s.read.duplicates == 1
    for e in (".bin", ".idx"):
        assert (tmp_path / f"q_text_document{e}").read_bytes() == (tmp_path / f"o_text_document{e}").read_bytes()
    s = preprocess(str(tmp_path / "p"), tok, [str(inp)], json_keys=["content"],
                   filters=FileFilters(max_file_size=100), progress=False)
    assert s.documents == 5 and s.read.filtered_max_file_size == 1
    # A repository whose rows are not consecutive would silently become two documents: refused.
    split = _jsonl(tmp_path / "split.jsonl", ["a = 1\n", "b = 2\n", "c = 3\n"], key="content",
                   extra=lambda i: {"repo_name": ["org/x", "org/y", "org/x"][i], "path": f"f{i}.py"})
    _expect_error(tmp_path, tok, [str(split)], r"split\.jsonl:3: repository 'org/x' again",
                  repo_context=True)
    pq.write_table(pa.table({"repo_name": ["org/x", "org/y", "org/x"], "path": ["a", "b", "c"],
                             "content": ["a = 1\n", "b = 2\n", "c = 3\n"]}), tmp_path / "split.parquet")
    _expect_error(tmp_path, tok, [str(tmp_path / "split.parquet")], r"row 3: repository 'org/x' again")


def _expect_error(tmp_path, tok, inputs, match, **kw):
    with pytest.raises(DataError, match=match):
        preprocess(str(tmp_path / "bad"), tok, inputs, progress=False, **kw)
    assert not list(tmp_path.glob("bad*")), "no output (final or temporary) may remain"


def test_bad_inputs(tmp_path, tok, capsys, starcoder2_tokenizer_path):
    _expect_error(tmp_path, tok, [str(tmp_path / "missing.jsonl")], "input not found")
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "ok2"}\n')
    _expect_error(tmp_path, tok, [str(bad)], r"in\.jsonl:2: malformed JSON")
    s = preprocess(str(tmp_path / "skip"), tok, [str(bad)], skip_malformed=True, progress=False)
    assert s.documents == 2 and s.read.malformed_lines == 1
    nonutf = tmp_path / "nonutf.jsonl"
    nonutf.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    _expect_error(tmp_path, tok, [str(nonutf)], r"nonutf\.jsonl:2: not valid UTF-8")
    empty = _jsonl(tmp_path / "empty.jsonl", ["a", "", "b"])
    _expect_error(tmp_path, tok, [str(empty)], r"empty\.jsonl:2: empty document")
    s = preprocess(str(tmp_path / "skip2"), tok, [str(empty)], skip_malformed=True, progress=False)
    assert s.documents == 2 and s.read.empty_documents == 1
    nokey = _jsonl(tmp_path / "nokey.jsonl", ["a"], key="content")
    _expect_error(tmp_path, tok, [str(nokey)], r"nokey\.jsonl:1: no text under key 'text'")
    data = gzip.compress(("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 200)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, tok, [str(tmp_path / "cut.jsonl.gz")], r"cut\.jsonl\.gz: compressed stream")
    import zstandard

    zdata = zstandard.ZstdCompressor().compress(("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 200)).encode())
    (tmp_path / "cut.jsonl.zst").write_bytes(zdata[: len(zdata) // 2])
    _expect_error(tmp_path, tok, [str(tmp_path / "cut.jsonl.zst")], r"cut\.jsonl\.zst: .*(corrupt|ends early)")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    if not os.access(tmp_path / "ro", os.W_OK):  # root ignores permissions
        with pytest.raises(DataError, match="cannot write"):
            preprocess(str(tmp_path / "ro" / "x"), tok, [str(empty)], progress=False)
    repo = tmp_path / "repos" / "r1"
    repo.mkdir(parents=True)
    (repo / "a.py").write_bytes(b"caf\xe9 = 1\n")
    _expect_error(tmp_path, tok, [str(tmp_path / "repos")], r"a\.py: not valid UTF-8")
    # the command line prints one line and exits with status 2
    rc = cli_main(["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "bad"),
                   "--tokenizer-model", str(starcoder2_tokenizer_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "in.jsonl:2" in err[0] and "Traceback" not in err[0]


def test_corrupt_index_files(tmp_path):
    with IndexedWriter(tmp_path / "d", np.uint16) as w:
        for n in (3, 5, 7):
            w.add_document(list(range(n)))
        w.finalize()
    good_idx = (tmp_path / "d.idx").read_bytes()
    good_bin = (tmp_path / "d.bin").read_bytes()
    assert IndexedDataset(tmp_path / "d").num_tokens == 15

    def broken(idx=good_idx, binary=good_bin, match=""):
        (tmp_path / "d.idx").write_bytes(idx)
        (tmp_path / "d.bin").write_bytes(binary)
        with pytest.raises(DataError, match=match):
            IndexedDataset(tmp_path / "d")

    broken(idx=b"XXIDIDX\x00\x00" + good_idx[9:], match=r"d\.idx: not a Megatron \.idx file")
    broken(idx=good_idx[:9] + (2).to_bytes(8, "little") + good_idx[17:], match="unsupported .idx version 2")
    broken(idx=good_idx[:-8], match=r"d\.idx: truncated or corrupt")
    broken(idx=good_idx[:20], match=r"d\.idx: truncated")
    broken(binary=good_bin[:-2], match=r"d\.bin: size .* truncated or mismatched")
    broken(idx=good_idx[:17] + bytes([99]) + good_idx[18:], match="unknown token dtype code 99")
    (tmp_path / "d.idx").write_bytes(good_idx)
    os.remove(tmp_path / "d.bin")
    with pytest.raises(DataError, match=r"d\.bin: missing"):
        IndexedDataset(tmp_path / "d")


def test_tools_script_runs_without_torch(tmp_path, starcoder2_tokenizer_path):
    """`python tools/preprocess_data.py` as Megatron users call it; start-up stays light
    (neither torch nor megatron-core nor transformers is imported on this path)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    inp = _jsonl(tmp_path / "in.jsonl", TEXTS)
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; "
             "rc = 0\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    rc = e.code\n"
             "print('HEAVY', [m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules]); sys.exit(rc)")
    args = [sys.executable, "-c", probe, str(repo / "tools" / "preprocess_data.py"), "--input", str(inp),
            "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", str(starcoder2_tokenizer_path),
            "--append-eod", "--workers", "2"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "documents: 6" in proc.stderr
    assert IndexedDataset(tmp_path / "o_text_document").num_documents == len(TEXTS)
    bad = subprocess.run(args[:5] + [str(tmp_path / "missing.jsonl")] + args[6:], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "input not found" in bad.stderr


def _code_texts(n: int, seed: int = 0) -> list[str]:
    """Code-like documents: indentation, CRLF, tabs, non-ASCII, quoted special-token text."""
    import random

    rng = random.Random(seed)
    lines = ["def f(x):\n", "    return x + 12\r\n", "\tpass  # é λ 7\n", "x = 1  <|endoftext|> y\n",
             "\n\n", "class A(object):   \n", "        print('héllo wörld', [i for i in range(9)])\n"]
    return ["".join(rng.choice(lines) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _portrait_equals_build(tmp_path, tokp, inputs: list[str], extra: list[str], name: str) -> Path:
    """preprocess --portrait with 2 workers, then `portrait build` over its output: the same file."""
    from megatron_sc2.governance.portrait import filter_path

    prefix = tmp_path / name
    args = ["preprocess", "--input", *inputs, "--output-prefix", str(prefix), "--tokenizer-model", tokp,
            "--workers", "2", "--no-progress", *extra]
    assert cli_main([*args, "--portrait", str(tmp_path / f"{name}-pre")]) == 0
    data = [(tmp_path / f"{name}_text_document{e}").read_bytes() for e in (".bin", ".idx", ".prov")]
    assert cli_main([*args[:4], str(tmp_path / f"{name}-plain"), *args[5:]]) == 0  # the flag changes no byte
    assert data == [(tmp_path / f"{name}-plain_text_document{e}").read_bytes() for e in (".bin", ".idx", ".prov")]
    assert cli_main(["portrait", "build", "--data-path", f"{prefix}_text_document", "--tokenizer-model", tokp,
                     "--output", str(tmp_path / f"{name}-built")]) == 0
    pre = filter_path(tmp_path / f"{name}-pre").read_bytes()
    assert pre == filter_path(tmp_path / f"{name}-built").read_bytes()
    assert sorted(p.name for p in (tmp_path / f"{name}-pre").iterdir()) == ["portrait.bloom"]  # no temporaries
    return tmp_path / f"{name}-pre"


def _windows(text: str) -> list[str]:
    """Data Portraits' windows of one text, written here from the rules (not the package's)."""
    import re

    s = re.sub(r"[\r\n]+", "\n", text)
    s = re.sub(r"[^\S\n]+", " ", s).replace("\n ", "\n").strip()
    return [s[j:j + 50] for j in range(0, len(s) - 49, 50)]


def test_portrait_during_preprocess_is_the_portrait_build_file(tmp_path, starcoder2_tokenizer_path):
    """JSONL (more than one encoder chunk, 2 workers) and a directory of repositories: the
    portrait written while preprocessing is byte for byte `portrait build` of the finished
    dataset, and every window of every input text is in it (no false negatives)."""
    from megatron_sc2.governance.bloom import BloomFilter

    tokp = str(starcoder2_tokenizer_path)
    texts = _code_texts(1300)
    inp = _jsonl(tmp_path / "in.jsonl", texts)
    d = _portrait_equals_build(tmp_path, tokp, [str(inp)], ["--append-eod"], "j")
    bf = BloomFilter.open(d / "portrait.bloom")
    windows = [w for t in texts for w in _windows(t)]
    assert len(windows) > 5000 and bf.contains(windows).all()
    assert bf.meta["documents"] == len(texts) and bf.meta["datasets"] == [str(tmp_path / "j_text_document")]
    # repositories in StarCoder2's format: one document per repository, a window never crosses a file
    files = {}
    for r, code in enumerate(_code_texts(60, seed=1)):
        p = tmp_path / "repos" / f"repo{r // 3}" / "src" / f"m{r % 3}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(code, newline="")
        files[p] = code
    d = _portrait_equals_build(tmp_path, tokp, [str(tmp_path / "repos")], ["--seed", "3"], "r")
    bf = BloomFilter.open(d / "portrait.bloom")
    # a file's segment is its code, or `path\ncode` in a document with metadata (<repo_name>)
    forms = [(_windows(code), _windows(f"src/{p.name}\n{code}")) for p, code in files.items()]
    assert sum(len(a) for a, _ in forms) > 300
    assert all(bf.contains(a).all() or bf.contains(b).all() for a, b in forms)
    assert sum(bool(b) and bf.contains(b).all() for _, b in forms) >= 10  # both forms occur
    # Megatron's behaviour: quoted special-token text becomes a control token and cuts the segment
    _portrait_equals_build(tmp_path, tokp, [str(inp)], ["--append-eod", "--parse-special-tokens"], "s")
    # several --json-keys: one portrait of all outputs, as `portrait build` over them in that order
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"text": a, "code": b}) + "\n" for a, b in zip(texts[:200], texts[200:400])))
    assert cli_main(["preprocess", "--input", str(two), "--output-prefix", str(tmp_path / "k"), "--tokenizer-model",
                     tokp, "--json-keys", "text", "code", "--no-progress", "--portrait", str(tmp_path / "k-pre")]) == 0
    assert cli_main(["portrait", "build", "--data-path", str(tmp_path / "k_text_document"),
                     str(tmp_path / "k_code_document"), "--tokenizer-model", tokp, "--output",
                     str(tmp_path / "k-built")]) == 0
    assert (tmp_path / "k-pre" / "portrait.bloom").read_bytes() == (tmp_path / "k-built" / "portrait.bloom").read_bytes()


def test_portrait_flag_failures_leave_nothing(tmp_path, starcoder2_tokenizer_path, capsys):
    tokp = str(starcoder2_tokenizer_path)
    bad = tmp_path / "in.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in _code_texts(1100)) + '{"text": "broken\n')
    base = ["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "bad"), "--tokenizer-model", tokp,
            "--workers", "2", "--no-progress"]

    def one_line(argv, needle):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err

    one_line([*base, "--portrait", str(tmp_path / "p")], "in.jsonl:1101: malformed JSON")
    assert not list(tmp_path.glob("bad*")) and list((tmp_path / "p").iterdir()) == []
    one_line([*base, "--portrait", str(tmp_path / "q"), "--portrait-error-rate", "1.5"], "--error-rate")
    assert not (tmp_path / "q").exists()
    (tmp_path / "afile").write_text("x")
    one_line([*base, "--portrait", str(tmp_path / "afile")], "afile")
    assert not list(tmp_path.glob("bad*"))


def test_portrait_failing_at_the_end_takes_the_dataset_with_it(tmp_path, tok, monkeypatch):
    """The portrait is staged with the last output pair: when writing it fails, neither it nor
    the dataset appears, and an older dataset and portrait stay as they were."""
    from megatron_sc2.governance import portrait

    inp = _jsonl(tmp_path / "in.jsonl", _code_texts(50))
    preprocess(str(tmp_path / "o"), tok, [str(inp)], progress=False,
               observers=[portrait.PreprocessPortrait(tmp_path / "p")])
    old = [p.read_bytes() for p in sorted(tmp_path.glob("o_*"))] + [(tmp_path / "p" / "portrait.bloom").read_bytes()]

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(portrait, "write_filter", disk_full)
    with pytest.raises(OSError):
        preprocess(str(tmp_path / "o"), tok, [str(_jsonl(tmp_path / "new.jsonl", _code_texts(60, 2)))],
                   progress=False, observers=[portrait.PreprocessPortrait(tmp_path / "p")])
    assert [p.read_bytes() for p in sorted(tmp_path.glob("o_*"))] + [(tmp_path / "p" / "portrait.bloom").read_bytes()] == old
    assert not [p for p in [*tmp_path.iterdir(), *(tmp_path / "p").iterdir()] if ".tmp-" in p.name]


def test_sentencepiece_special_text_keeps_documents_whole(tmp_path, capsys):
    """A SentencePiece tokenizer whose <|endoftext|> is a user-defined symbol (matched anywhere
    by SentencePiece): code quoting it stays one document, the trainer's batch sees one
    document; `--parse-special-tokens` restores SentencePiece's split (two documents)."""
    import sentencepiece as spm

    from megatron_sc2.data.batch import get_batch
    from tests.test_data_tokenizer import train_sp_model

    import torch

    model = train_sp_model(tmp_path / "sp")
    proc = spm.SentencePieceProcessor(model_file=str(model))
    tok = load_tokenizer(model)
    eod = tok.eod
    assert eod == proc.piece_to_id("<|endoftext|>")
    texts = ["s = '<|endoftext|>'\nprint(s)\n", "# <fim_prefix>a<fim_middle>b\n", "ok = 1\n"]
    inp = _jsonl(tmp_path / "in.jsonl", texts)

    def run(prefix, *extra):
        assert cli_main(["preprocess", "--input", str(inp), "--output-prefix", str(tmp_path / prefix),
                         "--tokenizer-model", str(model), "--append-eod", "--no-progress", *extra]) == 0
        ds = IndexedDataset(tmp_path / f"{prefix}_text_document")
        assert ds.num_documents == len(texts)
        return [ds.document(i).tolist() for i in range(len(texts))]

    def documents_seen(ids):  # what training makes of the document: document ids at eod
        b = get_batch(torch.tensor([ids + [eod]]), eod, reset_attention_mask=True)
        return int(b["document_ids"].max()) + 1

    docs = run("a")
    for t, ids in zip(texts, docs):
        assert ids == tok.encode(t, parse_special=False) + [eod] and ids.count(eod) == 1
        assert tok.decode(ids[:-1]) == t and documents_seen(ids) == 1
        assert not set(ids[:-1]) & set(tok.special_ids.values())
    assert docs[2] == proc.encode(texts[2]) + [eod]  # no symbol text: SentencePiece's own ids
    docs = run("m", "--parse-special-tokens")
    assert docs == [proc.encode(t) + [eod] for t in texts]
    assert docs[0].count(eod) == 2 and documents_seen(docs[0]) == 2
    assert tok.special_ids["fim_prefix"] in docs[1]
    # Repository documents: one <file_sep> per file however many the code quotes.
    (tmp_path / "repos" / "r").mkdir(parents=True)
    (tmp_path / "repos" / "r" / "a.py").write_text("x = '<file_sep>'  # <fim_prefix>\n")
    (tmp_path / "repos" / "r" / "b.py").write_text("y = '<|endoftext|>'\n")
    assert cli_main(["preprocess", "--input", str(tmp_path / "repos"), "--output-prefix", str(tmp_path / "r"),
                     "--tokenizer-model", str(model), "--no-progress"]) == 0
    ids = IndexedDataset(tmp_path / "r_text_document").document(0).tolist()
    sid = tok.special_ids
    assert ids.count(sid["file_sep"]) == 2 and ids.count(eod) == 1 and ids[-1] == eod
    assert sid["fim_prefix"] not in ids and ids.count(sid["repo_name"]) <= 1
    capsys.readouterr()
