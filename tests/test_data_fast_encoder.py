"""The tiktoken-based encoder equals `tokenizers` id for id: on the whole standard library,
on random strings, on the edge cases of DESIGN.md, and where tiktoken alone would not."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from megatron_sc2.data.prep.corpus import iter_stdlib_repositories
from megatron_sc2.data.fast_encoder import build_fast_encoder
from megatron_sc2.data.tokenizer import load_tokenizer
from tests.conftest import STARCODER2_TOKENIZER

EDGE_CASES = [
    "x =  12", "x = \t 12", "a  1", "  \n\n  99", "1234567890", "٣٤ ¹²³ ⅷ", "don't I'll we've",
    "<NAME> <EMAIL>x<file_sep>", "<|endoftext|>tail", "tab\tafter", "\u00a0nbsp  \u2003x",
    "emoji 🙂🙃 and 𝔘𝔫𝔦", "\U00040001 plane-4 char", "ﬁ ligature", "trailing spaces   ",
    "", "\r\n\r\n", "a" * 5000, " " * 300 + "x",
]


@pytest.fixture(scope="module")
def sc2():
    if not STARCODER2_TOKENIZER.is_file():
        pytest.skip(f"{STARCODER2_TOKENIZER} not present")
    tok = load_tokenizer(STARCODER2_TOKENIZER)
    fast = tok.fast_encoder()
    assert fast is not None, "StarCoder2's vocabulary supports the fast encoder"
    return tok, fast


def _hf(tok, texts):
    return [e.ids for e in tok.hf.encode_batch(list(texts), add_special_tokens=False)]


def test_stdlib_id_for_id(sc2):
    tok, fast = sc2
    texts = [text for _, files in iter_stdlib_repositories() for _, text in files]
    assert len(texts) > 1000
    before = dict(fast.stats)
    got = fast.encode_batch(texts)
    want = _hf(tok, texts)
    diff = [i for i in range(len(texts)) if got[i] != want[i]]
    assert not diff, f"{len(diff)} files differ"
    # the fast path really was used for (nearly) all of it
    assert fast.stats["fallback"] - before["fallback"] <= len(texts) // 100
    # repository documents: special-token text between the files
    from megatron_sc2.data.prep.repo_format import format_repository

    docs = [format_repository(name, files, 7) for name, files in list(iter_stdlib_repositories())[:60]]
    assert fast.encode_batch(docs) == _hf(tok, docs)


def test_edge_cases(sc2):
    tok, fast = sc2
    assert fast.encode_batch(EDGE_CASES) == _hf(tok, EDGE_CASES)
    assert fast.risky_chars.search("\U00040001")  # a byte without a token: handled by tokenizers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.text(alphabet=" \t\n0123456789abc'_-=+(){}<>|éß中🙂\u00a0", max_size=40),
    st.sampled_from(["<fim_prefix>", "<NAME>", "<|endoftext|>", "'s", "'ll", "  1", "\n\n\n"])),
    min_size=1, max_size=6))
def test_random_strings(sc2, parts):
    tok, fast = sc2
    text = "".join(parts)
    assert fast.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids


def test_unlisted_merge_falls_back(tmp_path):
    """A vocabulary where tiktoken alone differs: "abc" is listed as a+bc, but ab merges
    first, so tokenizers stops at [ab, c] while tiktoken would join ab+c."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from megatron_sc2.data.fast_encoder import bytes_to_unicode

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {"<|endoftext|>": 0}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [("a", "b"), ("b", "c"), ("a", "bc")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    fast = build_fast_encoder(tok)
    assert fast is not None
    abc = vocab["abc"]
    assert not fast.clean[abc]
    assert fast.encoding.encode("abc") == [abc]          # tiktoken alone: wrong
    assert t.encode("abc").ids == [vocab["ab"], vocab["c"]]
    texts = ["abc", "xabcx abc", "bc abd"]
    assert fast.encode_batch(texts) == [t.encode(s).ids for s in texts]
    assert fast.stats["fallback"] == 2


def test_unsupported_tokenizers_stay_with_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    t = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")]))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "ws.json"))
    assert build_fast_encoder(load_tokenizer(tmp_path / "ws.json")) is None
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.normalizer = normalizers.NFKC()
    t.save(str(tmp_path / "nfkc.json"))
    tok = load_tokenizer(tmp_path / "nfkc.json")
    assert build_fast_encoder(tok) is None
    assert tok.encode_batch(["ab"]) == [tok.encode("ab")]
