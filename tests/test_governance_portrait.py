"""The membership test (Data Portraits): no false negatives, scores and spans equal to a plain
reference implementation written here (a Python set of windows, a per-character normalizer),
sharded build + OR merge equal to a single build byte for byte, and bad filters refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.errors import ConfigError
from megatron_sc2.governance import portrait
from megatron_sc2.governance.bloom import HEADER_BYTES, BloomFilter
from megatron_sc2.governance.corpus_text import TokenText
from megatron_sc2.governance.normalize import normalize, normalize_with_offsets

WORDS = ["def", "return", "self", "import", "class", "x", "y", "value", "for", "in", "if", "else", "None",
         "print(", ")", "[", "]", "=", "+=", "0", "42", "'s'", "é", "λ", "#", "while", "True", ":"]


def random_code(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        indent = rng.choice(["", "    ", "        ", "\t"])
        out.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))))
    return rng.choice(["\n", "\r\n"]).join(out) + "\n"


# -- the plain reference -------------------------------------------------------------------

def ref_normalize_offsets(text: str) -> tuple[str, list[int]]:
    """The rules one character at a time: line-break runs -> one newline, other whitespace runs
    -> one space, no space after a newline, strip; each kept character's source offset."""
    out: list[tuple[str, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\r\n":
            j = i
            while j < n and text[j] in "\r\n":
                j += 1
            out.append(("\n", i))
            i = j
        elif c.isspace():
            j = i
            while j < n and text[j].isspace() and text[j] not in "\r\n":
                j += 1
            if not (out and out[-1][0] == "\n"):
                out.append((" ", i))
            i = j
        else:
            out.append((c, i))
            i += 1
    while out and out[0][0].isspace():
        out.pop(0)
    while out and out[-1][0].isspace():
        out.pop()
    return "".join(c for c, _ in out), [o for _, o in out]


def ref_query(windows: set[str], text: str) -> tuple[int, float, list[list[int]]]:
    norm, offs = ref_normalize_offsets(text)
    w = len(norm) - 49
    if w <= 0:
        return 0, 0.0, []
    hit = [norm[j:j + 50] in windows for j in range(w)]
    chain = [0] * w
    for j in range(w):
        if hit[j]:
            chain[j] = (chain[j - 50] if j >= 50 else 0) + 1
    longest = max(chain)
    spans = []
    for j in range(w):
        if chain[j] and not (j + 50 < w and chain[j + 50]):
            a = j - 50 * (chain[j] - 1)
            spans.append([offs[a], offs[j + 49] + 1])
    spans.sort()
    merged: list[list[int]] = []
    for s in spans:
        if merged and s[0] <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s[1])
        else:
            merged.append(list(s))
    return longest, (len(norm) - 49) / 50, merged


def ref_index(segments: list[str]) -> set[str]:
    out = set()
    for seg in segments:
        s, _ = ref_normalize_offsets(seg)
        out.update(s[j:j + 50] for j in range(0, len(s) - 49, 50))
    return out


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two datasets: JSON lines of random code, and repositories (metadata and plain forms)."""
    from conftest import STARCODER2_TOKENIZER

    if not STARCODER2_TOKENIZER.is_file():
        pytest.skip(f"{STARCODER2_TOKENIZER} not present")
    tmp = tmp_path_factory.mktemp("portrait")
    tok = load_tokenizer(STARCODER2_TOKENIZER)
    rng = random.Random(0)
    texts = [random_code(rng, rng.randint(1, 40)) for _ in range(60)]
    with open(tmp / "a.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    preprocess(str(tmp / "a"), tok, inputs=[str(tmp / "a.jsonl")], append_eod=True, progress=False)
    files = {}
    for r in range(6):
        for k in range(3):
            p = tmp / "repos" / f"repo{r}" / f"f{k}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            files[p] = random_code(rng, rng.randint(5, 30))
            p.write_bytes(files[p].encode())
    preprocess(str(tmp / "b"), tok, inputs=[str(tmp / "repos")], append_eod=True, progress=False)
    prefixes = [str(tmp / "a_text_document"), str(tmp / "b_text_document")]
    text = TokenText(tok)
    segments = [s for p in prefixes for ds in [IndexedDataset(p)] for d in range(ds.num_documents)
                for s in text.segments(ds.document(d))]
    return dict(tmp=tmp, tok=tok, prefixes=prefixes, texts=texts, files=files, segments=segments, rng=rng)


def _build(corpus, out: Path, **kw) -> BloomFilter:
    portrait.build(corpus["prefixes"], corpus["tok"], out, **kw)
    return BloomFilter.open(portrait.filter_path(out))


# -- tests ---------------------------------------------------------------------------------

def test_normalization_matches_the_reference():
    rng = random.Random(1)
    alphabet = ["a", "b", " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\xa0", "\u2028", "é", "\x85", "x y",
                "\n\n\n", "        ", "\t \t", " \r ", "\n \n", "\x1c", "\u3000"]
    for _ in range(6000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        ref, ref_offs = ref_normalize_offsets(s)
        got, offs = normalize_with_offsets(s)
        assert got == ref == normalize(s) and offs.tolist() == ref_offs


def test_segments_decode_like_the_tokenizer(corpus):
    tok, text = corpus["tok"], TokenText(corpus["tok"])
    ds = IndexedDataset(corpus["prefixes"][0])
    for d in range(ds.num_documents):
        ids = ds.document(d)
        assert text.segments(ids) == [tok.decode(ids[:-1].tolist())]  # one segment before <|endoftext|>
        assert corpus["texts"][d] == text.segments(ids)[0]


def test_no_false_negatives_and_reference_scores(corpus):
    out = corpus["tmp"] / "p1"
    bf = _build(corpus, out, error_rate=1e-9)  # no false positive is plausible: exact equality with a set
    ref = ref_index(corpus["segments"])
    assert len(ref) > 100
    windows = [w for seg in corpus["segments"] for w in portrait.index_windows(seg)]
    assert bf.contains(windows).all() and set(windows) == ref  # every window of every document

    rng = random.Random(2)
    pool = corpus["texts"] + list(corpus["files"].values())
    for trial in range(150):
        parts = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                src = rng.choice(pool)
                a = rng.randrange(len(src))
                piece = src[a:a + rng.randint(0, 700)]
                if rng.random() < 0.5:  # re-indented and CRLF: the same normalized text
                    piece = piece.replace("\n", "\r\n").replace("    ", "  \t ")
                parts.append(piece)
            else:
                parts.append(random_code(rng, rng.randint(0, 8)))
        q = "".join(parts)
        res = portrait.query_text(bf, q)
        longest, expected, spans = ref_query(ref, q)
        assert res.longest_chain == longest and res.spans == spans, trial
        assert res.expected_chain == pytest.approx(expected)
        if expected:
            assert res.score == pytest.approx(longest / expected)


def test_corpus_files_score_one_new_code_zero(corpus):
    bf = _build(corpus, corpus["tmp"] / "p2")
    rng = random.Random(3)
    for path, code in corpus["files"].items():
        n = len(normalize(code))
        if n < 800:
            continue
        res = portrait.query_text(bf, code)
        assert res.score >= 1 - 50 / n, (path, res.score)
        assert res.spans and res.spans[0][0] <= 60 and res.spans[-1][1] >= len(code.rstrip()) - 60
    new = [random_code(rng, 40) for _ in range(20)]
    scores = [portrait.query_text(bf, t).score for t in new]
    assert max(scores) < 0.1


def test_spans_in_the_callers_characters(corpus):
    """A corpus file pasted re-indented with CRLF between new code: the span covers the pasted
    part in the text as sent (what the VS Code extension underlines)."""
    bf = _build(corpus, corpus["tmp"] / "p3")
    code = max(corpus["files"].values(), key=len)
    pasted = code.replace("\n", "\r\n").replace("    ", "\t")
    rng = random.Random(4)
    before, after = "x = λ\n" * 3 + random_code(rng, 3), random_code(rng, 3)
    q = before + pasted + after
    res = portrait.query_text(bf, q)
    assert len(res.spans) == 1
    a, b = res.spans[0]
    assert len(before) <= a < len(before) + 60 and len(before) + len(pasted) - 60 < b <= len(before) + len(pasted)
    assert normalize(q[a:b]) in normalize(code)
    assert res.spans == ref_query(ref_index(corpus["segments"]), q)[2]


def test_sharded_build_merges_to_the_single_build(corpus, capsys):
    single = corpus["tmp"] / "single"
    sharded = corpus["tmp"] / "sharded"
    tokp = str(corpus["tok"].path)
    args = ["portrait", "build", "--data-path", *corpus["prefixes"], "--tokenizer-model", tokp]
    assert cli_main([*args, "--output", str(single)]) == 0
    for i in (2, 0, 1):
        assert cli_main([*args, "--output", str(sharded), "--shard", f"{i}/3"]) == 0
    assert cli_main(["portrait", "merge", str(sharded)]) == 0
    a = portrait.filter_path(single).read_bytes()
    b = portrait.filter_path(sharded).read_bytes()
    assert a == b and len(a) > HEADER_BYTES
    shard_bits = [np.fromfile(p, np.uint8, offset=HEADER_BYTES) for p in sorted((sharded / "shards").iterdir())]
    assert all((s != np.fromfile(portrait.filter_path(single), np.uint8, offset=HEADER_BYTES)).any()
               for s in shard_bits)  # each shard alone is not the whole
    capsys.readouterr()
    assert cli_main(["portrait", "query", str(single), str(next(iter(corpus["files"]))), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"longest_chain", "expected_chain", "score", "spans"}


def test_bad_filters_are_one_line_naming_the_file(corpus, capsys, tmp_path):
    good = corpus["tmp"] / "p4"
    _build(corpus, good)
    path = portrait.filter_path(good)
    q = tmp_path / "q.txt"
    q.write_text("print(1)\n")

    def one_line_error(argv, needle):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        return err

    one_line_error(["portrait", "query", str(tmp_path / "none"), str(q)], str(tmp_path / "none" / "portrait.bloom"))
    bad = tmp_path / "trunc"
    bad.mkdir()
    data = path.read_bytes()
    (bad / "portrait.bloom").write_bytes(data[:-100])
    assert "truncated" in one_line_error(["portrait", "query", str(bad), str(q)], str(bad / "portrait.bloom"))
    (bad / "portrait.bloom").write_bytes(data.replace(b"blake2b128-double", b"murmur3-128-doubl", 1))
    assert "other parameters" in one_line_error(["portrait", "query", str(bad), str(q)], str(bad))
    (bad / "portrait.bloom").write_bytes(b"garbage")
    one_line_error(["portrait", "query", str(bad), str(q)], str(bad / "portrait.bloom"))
    # shards made with other sizing do not merge; a missing shard is named
    sh = tmp_path / "sh"
    tokp = str(corpus["tok"].path)
    args = ["portrait", "build", "--data-path", *corpus["prefixes"], "--tokenizer-model", tokp, "--output", str(sh)]
    assert cli_main([*args, "--shard", "0/2"]) == 0
    one_line_error(["portrait", "merge", str(sh)], "portrait-00001-of-00002.bloom")
    assert cli_main([*args, "--shard", "1/2", "--capacity", "1000"]) == 0
    assert "other parameters" in one_line_error(["portrait", "merge", str(sh)], "portrait-00001-of-00002.bloom")
    with pytest.raises(ConfigError):
        portrait.parse_shard("3/2")
    one_line_error(["portrait", "build", "--data-path", str(tmp_path / "nodata"), "--tokenizer-model", tokp,
                    "--output", str(sh)], str(tmp_path / "nodata"))
    one_line_error(["portrait", "query", str(good), str(tmp_path / "missing.txt")], "missing.txt")


def test_server_answers_overlap_for_a_real_http_client(corpus, capsys):
    import http.client
    import threading

    from megatron_sc2.governance.serve import make_server

    out = corpus["tmp"] / "p5"
    bf = _build(corpus, out)
    server = make_server(str(out), "127.0.0.1", 0, max_body=100_000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]

    def request(method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    try:
        code = max(corpus["files"].values(), key=len)
        rng = random.Random(5)
        # what the extension sends: 250 characters either side of the cursor, here CRLF and tabs
        doc = (random_code(rng, 6) + code.replace("\n", "\r\n").replace("    ", "\t") + random_code(rng, 6))
        mid = len(doc) // 2
        doc = doc[max(0, mid - 250): mid + 250]
        status, got = request("POST", "/overlap", json.dumps({"document": doc}),
                              {"Content-Type": "application/json"})
        assert status == 200 and got == {"spans": ref_query(ref_index(corpus["segments"]), doc)[2]}
        assert got["spans"] and all(normalize(doc[a:b]) in normalize(code) for a, b in got["spans"])
        status, full = request("POST", "/query", json.dumps({"document": code}))
        assert status == 200 and full["score"] == pytest.approx(portrait.query_text(bf, code).score) and full["score"] > 0.9
        status, health = request("GET", "/health")
        assert status == 200 and health["num_bits"] == bf.params.num_bits
        # bad requests: 4xx with a message, and the server keeps serving
        for method, path, body, want in [("POST", "/overlap", "{not json", 400),
                                         ("POST", "/overlap", json.dumps({"text": "x"}), 400),
                                         ("POST", "/overlap", json.dumps({"document": 5}), 400),
                                         ("POST", "/overlap", json.dumps(["document"]), 400),
                                         ("POST", "/overlap", b"\xff\xfe", 400),
                                         ("POST", "/nothing", json.dumps({"document": "x"}), 404),
                                         ("GET", "/overlap", None, 405),
                                         ("POST", "/overlap", json.dumps({"document": "x" * 200_000}), 413)]:
            status, err = request(method, path, body)
            assert status == want and isinstance(err.get("error"), str) and err["error"], (path, body)
        status, got = request("POST", "/overlap", json.dumps({"document": ""}))
        assert status == 200 and got == {"spans": []}
    finally:
        server.shutdown()
        server.server_close()
    capsys.readouterr()
    assert cli_main(["serve", "--portrait", str(corpus["tmp"] / "nowhere")]) == 2
    assert "portrait.bloom" in capsys.readouterr().err


def test_packed_builder_sets_the_same_bits(corpus, monkeypatch):
    """Past BOOL_LIMIT bits the builder keeps packed bytes: the file must not change."""
    from megatron_sc2.governance.bloom import BitBuilder

    a, b = corpus["tmp"] / "bool", corpus["tmp"] / "packed"
    portrait.build(corpus["prefixes"], corpus["tok"], a)
    monkeypatch.setattr(BitBuilder, "BOOL_LIMIT", 64)
    portrait.build(corpus["prefixes"], corpus["tok"], b)
    assert portrait.filter_path(a).read_bytes() == portrait.filter_path(b).read_bytes()


def test_window_bound_is_an_upper_bound_streamed(corpus):
    """The sizing every shard computes: per document, its tokens' characters // 50, streamed in
    chunks of any size, never below the windows actually inserted."""
    text = TokenText(corpus["tok"])
    datasets = [IndexedDataset(p) for p in corpus["prefixes"]]
    lengths = text.char_lengths()
    ref = sum(int(lengths[ds.document(d).astype(np.int64)].sum()) // 50 for ds in datasets for d in range(ds.num_documents))
    assert portrait.window_bound(datasets, text) == portrait.window_bound(datasets, text, chunk=13) == ref
    windows = sum(len(portrait.index_windows(s)) for s in corpus["segments"])
    assert windows <= ref
