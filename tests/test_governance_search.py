"""Corpus search: counts equal a brute-force count over the `.bin` documents, `find` names the
right documents with repository and path from the provenance, sharded builds equal whole ones,
queries that cannot occur answer 0, broken indexes are one line naming the file."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.governance import search

WORDS = ["def", "return", "self", "import", "x", "y", "(", ")", "=", "0", "1", "if", ":", "é", "\n", "    "]


def code(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import STARCODER2_TOKENIZER

    if not STARCODER2_TOKENIZER.is_file():
        pytest.skip(f"{STARCODER2_TOKENIZER} not present")
    tmp = tmp_path_factory.mktemp("search")
    tok = load_tokenizer(STARCODER2_TOKENIZER)
    rng = random.Random(0)
    rows = [{"text": code(rng, rng.randint(1, 200)), "repo_name": f"org/r{i % 7}", "path": f"src/m{i}.py"}
            for i in range(80)]
    rows[13]["text"] += "MARKER_one = 1\n"
    with open(tmp / "a.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    preprocess(str(tmp / "a"), tok, inputs=[str(tmp / "a.jsonl")], append_eod=True, progress=False)
    for r in range(5):
        for k in range(3):
            p = tmp / "repos" / f"repo{r}" / "pkg" / f"f{k}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(code(rng, rng.randint(20, 120)) + ("MARKER_two = 2\n" if (r, k) == (3, 1) else ""))
    preprocess(str(tmp / "b"), tok, inputs=[str(tmp / "repos")], append_eod=True, progress=False)
    prefixes = [str(tmp / "a_text_document"), str(tmp / "b_text_document")]
    docs = [ds.document(d).astype(np.int64) for p in prefixes for ds in [IndexedDataset(p)] for d in range(ds.num_documents)]
    whole = tmp / "idx"
    search.build(prefixes, whole, str(STARCODER2_TOKENIZER), shard_tokens=4000)  # several shards: queries fan out
    return dict(tmp=tmp, tok=tok, prefixes=prefixes, docs=docs, whole=whole, rng=rng)


def brute_count(docs: list[np.ndarray], q: np.ndarray) -> int:
    n = 0
    for d in docs:
        if len(d) >= len(q):
            n += int((np.lib.stride_tricks.sliding_window_view(d, len(q)) == q).all(axis=1).sum())
    return n


def test_count_equals_brute_force(corpus):
    index = search.SearchIndex(corpus["whole"])
    assert len(index.shards) > 2
    rng = np.random.default_rng(1)
    docs = corpus["docs"]
    checked_nonzero = 0
    for trial in range(300):
        n = int(rng.integers(1, 9))
        if trial % 3:
            d = docs[int(rng.integers(len(docs)))]
            a = int(rng.integers(0, max(len(d) - n, 0) + 1))
            q = d[a:a + n]
        else:  # random ids: mostly absent
            q = rng.integers(0, 3000, size=n)
        want = brute_count(docs, q)
        assert index.count_ids(q) == want, (trial, q)
        checked_nonzero += want > 0
    assert checked_nonzero > 150
    # across a document boundary: end of one document + start of the next never counts
    q = np.concatenate([docs[0][-2:], docs[1][:2]])
    assert index.count_ids(q) == brute_count(docs, q)
    assert index.count_ids(np.concatenate(docs[:2])) == 0
    assert index.count_ids(np.concatenate([docs[0], docs[0]])) == 0  # longer than any document
    assert index.count_ids([]) == 0 and index.count_ids([65535]) == 0 and index.count_ids([70000]) == 0


def test_text_queries_and_unknown_bytes(corpus, capsys):
    idx = str(corpus["whole"])
    tok = corpus["tok"]
    for text in ["import", " self", "def x", " return self"]:
        capsys.readouterr()
        assert cli_main(["search", "count", idx, text, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["count"] == brute_count(corpus["docs"], np.asarray(tok.encode(text))) > 0
    for text in ["\U00040000\U00050000", "\udcff", "", "x" * 100_000]:
        capsys.readouterr()
        assert cli_main(["search", "count", idx, text]) == 0
        assert capsys.readouterr().out.strip() == "0"


def test_find_names_repository_and_path(corpus, capsys):
    idx = str(corpus["whole"])
    capsys.readouterr()
    assert cli_main(["search", "find", idx, "MARKER_one = 1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["count"] == 1 and len(res["hits"]) == 1
    h = res["hits"][0]
    assert (h["dataset"], h["document"], h["repository"], h["path"]) == (corpus["prefixes"][0], 13, "org/r6", "src/m13.py")
    assert "MARKER_one = 1" in h["snippet"]
    assert cli_main(["search", "find", idx, "MARKER_two = 2", "--json"]) == 0
    h = json.loads(capsys.readouterr().out)["hits"][0]
    assert (h["dataset"], h["repository"], h["path"]) == (corpus["prefixes"][1], "repo3", "pkg/f1.py")
    # many hits: the limit, in corpus order, each in a document that really holds the text
    index = search.SearchIndex(corpus["whole"])
    q = np.asarray(corpus["tok"].encode(" self"))
    count, hits = index.find_ids(q, limit=25)
    assert count == brute_count(corpus["docs"], q) and len(hits) == 25
    flat = [(0, d) for d in range(IndexedDataset(corpus["prefixes"][0]).num_documents)] + [
        (1, d) for d in range(IndexedDataset(corpus["prefixes"][1]).num_documents)]
    for di, doc, off in hits:
        ids = corpus["docs"][flat.index((di, doc))]
        assert np.array_equal(ids[off:off + len(q)], q)


def test_sharded_build_equals_whole_build(corpus, capsys):
    whole = corpus["whole"]
    n = len(json.loads((whole / "search.json").read_text())["shards"])
    parts = corpus["tmp"] / "parts"
    tokp = str(json.loads((whole / "search.json").read_text())["tokenizer"])
    for i in reversed(range(n)):
        assert cli_main(["search", "build", "--data-path", *corpus["prefixes"], "--output", str(parts),
                         "--tokenizer-model", tokp, "--shard", f"{i}/{n}"]) == 0
    assert cli_main(["search", "merge", str(parts)]) == 0
    for f in sorted(whole.glob("*.bin")) + [whole / "search.json"]:
        assert (parts / f.name).read_bytes() == f.read_bytes(), f.name


def test_broken_index_is_one_line_naming_the_file(corpus, capsys, tmp_path):
    import shutil

    def one_line_error(argv, needle):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err

    one_line_error(["search", "count", str(tmp_path / "none"), "x"], str(tmp_path / "none" / "search.json"))
    bad = tmp_path / "bad"
    shutil.copytree(corpus["whole"], bad)
    sa = sorted(bad.glob("sa-*.bin"))[1]
    sa.write_bytes(sa.read_bytes()[:-3])
    one_line_error(["search", "count", str(bad), "x"], str(sa))
    sa.unlink()
    one_line_error(["search", "count", str(bad), "x"], str(sa))
    (bad / "search.json").write_text("{")
    one_line_error(["search", "count", str(bad), "x"], str(bad / "search.json"))
    part = tmp_path / "part"
    assert cli_main(["search", "build", "--data-path", *corpus["prefixes"], "--output", str(part), "--shard", "1/3"]) == 0
    one_line_error(["search", "merge", str(part)], "shard-00000-of-00003.json")
    one_line_error(["search", "build", "--data-path", str(tmp_path / "x"), "--output", str(part)], str(tmp_path / "x"))


def test_int32_datasets_index_too(tmp_path):
    """Vocabularies over 65,500 ids store int32 tokens: the index uses uint32 and its own separator."""
    from megatron_sc2.data.indexed import write_documents

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 6, size=int(rng.integers(1, 60))) * 20000 for _ in range(40)]
    write_documents(tmp_path / "w", docs, dtype=np.int32)
    search.build([str(tmp_path / "w")], tmp_path / "ix")
    index = search.SearchIndex(tmp_path / "ix")
    assert index.shards[0].tokens.dtype == np.uint32
    for n in (1, 2, 3, 5):
        for _ in range(20):
            d = docs[int(rng.integers(len(docs)))]
            a = int(rng.integers(0, max(len(d) - n, 0) + 1))
            q = d[a:a + n]
            assert index.count_ids(q) == brute_count([x.astype(np.int64) for x in docs], q)


def test_bm25_ranks_like_a_plain_reference(corpus, capsys):
    """The ranked mode against BM25 computed here from the decoded documents (Lucene's formula)."""
    import math
    import re
    from collections import Counter

    from megatron_sc2.governance.corpus_text import TokenText

    out = corpus["tmp"] / "bm25"
    tokp = str(corpus["tok"].path)
    search.build(corpus["prefixes"], out, tokp, shard_tokens=4000, with_bm25=True)
    index = search.SearchIndex(out)
    assert len(index.shards) > 2
    text = TokenText(corpus["tok"])
    keys, bags = [], []
    for di, p in enumerate(corpus["prefixes"]):
        ds = IndexedDataset(p)
        for d in range(ds.num_documents):
            keys.append((di, d))
            bags.append(Counter(re.findall(r"\w+", "\n".join(text.segments(ds.document(d))).lower())))
    n, avgdl = len(bags), sum(sum(b.values()) for b in bags) / len(bags)

    def ref(query):
        q = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
        scores = {}
        for t in q:
            df = sum(t in b for b in bags)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for k, b in zip(keys, bags):
                if t in b:
                    tf, dl = b[t], sum(b.values())
                    scores[k] = scores.get(k, 0.0) + idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl))
        return scores

    for query in ["return self", "MARKER_one", "import x y", "def", "É if", "nothing_here"]:
        want = ref(query)
        matched, got = index.rank_bm25(query, limit=10)
        assert matched == len(want)
        best = sorted(want.items(), key=lambda kv: -kv[1])[:10]
        assert [s for s, _, _ in got] == pytest.approx([s for _, s in best], rel=1e-9)
        for s, di, d in got:
            assert want[(di, d)] == pytest.approx(s, rel=1e-9)
    capsys.readouterr()
    assert cli_main(["search", "find", str(out), "marker_TWO", "--bm25", "--json", "--limit", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    h = res["hits"][0]
    assert res["count"] == 1 and (h["repository"], h["path"]) == ("repo3", "pkg/f1.py") and "MARKER_two" in h["snippet"]
    capsys.readouterr()
    assert cli_main(["search", "find", str(corpus["whole"]), "x", "--bm25"]) == 2
    assert "--bm25" in capsys.readouterr().err
