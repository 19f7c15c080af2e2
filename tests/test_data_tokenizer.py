"""Tokenizer loading and training: HF files and directories, SentencePiece, the missing
end-of-document error, StarCoder2's special tokens, and the files `transformers` loads."""

from __future__ import annotations

import json

import pytest

from megatron_sc2.data.prep.corpus import iter_stdlib_repositories
from megatron_sc2.data.special_tokens import STARCODER2_SPECIAL_TOKENS
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.data.prep.train_tokenizer import main as train_main, train_tokenizer
from megatron_sc2.errors import ConfigError, DataError

SNIPPETS = ["def f(x):\n    return x + 12345\n", "x =  12\n", "print('héllo wörld')  # ☃\n",
            "class A:\n\tpass\n\n\n", "<fim_prefix>a<fim_suffix>b<fim_middle>c", "  \n \t 99 bottles"]


def _small_corpus(limit_bytes: int = 400_000) -> list[str]:
    texts, n = [], 0
    for _, files in iter_stdlib_repositories():
        for _, text in files:
            texts.append(text)
            n += len(text)
            if n > limit_bytes:
                return texts
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(_small_corpus(), 800, out)
    return out


def test_starcoder2_tokenizer_loads(starcoder2_tokenizer_path):
    import tokenizers

    tok = load_tokenizer(starcoder2_tokenizer_path)
    ref = tokenizers.Tokenizer.from_file(str(starcoder2_tokenizer_path))
    assert tok.vocab_size == 49152 and tok.eod == 0
    assert tok.special_ids == {"eod": 0, "fim_prefix": 1, "fim_middle": 2, "fim_suffix": 3, "fim_pad": 4,
                               "repo_name": 5, "file_sep": 6}
    for s in SNIPPETS:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(SNIPPETS) == [tok.encode(s) for s in SNIPPETS]
    # the directory form loads the same tokenizer
    assert load_tokenizer(starcoder2_tokenizer_path.parent).encode(SNIPPETS[0]) == tok.encode(SNIPPETS[0])


def test_trained_tokenizer_has_starcoder2_specials(trained):
    data = json.loads((trained / "tokenizer.json").read_text())
    assert [(a["id"], a["content"]) for a in data["added_tokens"]] == list(enumerate(STARCODER2_SPECIAL_TOKENS))
    tok = load_tokenizer(trained)
    assert tok.vocab_size == 800 and tok.eod == 0 and tok.special_ids["file_sep"] == 6
    # single digits are split: no learned token holds two digits
    vocab = tok.hf.get_vocab()
    assert not any(sum(c.isdigit() for c in t) > 1 for t in vocab)
    for s in SNIPPETS:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<repo_name>x<file_sep>y")[0] == 5


def test_save_hf_loads_in_transformers(trained, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(trained)
    tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.eos_token == "<|endoftext|>" and hf.bos_token == "<|endoftext|>" and hf.eos_token_id == 0
    for s in SNIPPETS:
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s)
        assert hf(s)["input_ids"] == tok.encode(s)  # no BOS/EOS added by default


def test_train_tokenizer_cli_and_errors(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SNIPPETS * 20))
    assert train_main(["--input", str(corpus), "--output", str(tmp_path / "t"), "--vocab-size", "400"]) == 0
    assert load_tokenizer(tmp_path / "t").vocab_size <= 400
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(["abc"], 100, tmp_path / "u")
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([], 400, tmp_path / "v")
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_tokenizer_without_eod_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-document token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable"):
        load_tokenizer(tmp_path / "bad.json")


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(_small_corpus(60_000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", eos_id=2, bos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2, max_sentence_length=100000)
    tok = load_tokenizer(tmp_path / "sp.model")
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.backend == "sentencepiece" and tok.eod == proc.eos_id() == 2
    assert tok.vocab_size == 300
    s = "def f(x):\n    return x"
    assert tok.encode(s) == proc.encode(s)
    assert tok.encode_batch([s, s]) == [proc.encode(s)] * 2
    with pytest.raises(DataError, match="SentencePiece .* not supported"):
        tok.save_hf(tmp_path / "hf")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "noeos"), vocab_size=300,
                                   model_type="bpe", eos_id=-1, bos_id=-1, unk_id=0, pad_id=-1,
                                   minloglevel=2, max_sentence_length=100000)
    with pytest.raises(DataError, match="no end-of-document token"):
        load_tokenizer(tmp_path / "noeos.model")


# -- SentencePiece: special-token text stays text (parse_special=False) ---------------------------

SP_SYMBOLS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
              "<file_sep>"]
SP_VOCAB_SYMBOL = "\t\t"  # a user-defined whitespace run: vocabulary, not special-token text
SP_CONTROL = "<issue_start>"
SP_QUOTING = ["x = '<|endoftext|>'\n", "<fim_prefix>a<fim_suffix>b<fim_middle>c", "# <file_sep>x.py\n<repo_name>r",
              f"s = '<fim_pad>{SP_CONTROL}'  # </s> <s> <unk>\n", "<|endoftext|><|endoftext|>",
              "é\u00ff<fim_prefix>\U0001F600 <|endoftext|", "  <file_sep>\n    <file_sep>  "]


def train_sp_model(out_prefix, model_type: str = "bpe", byte_fallback: bool = True,
                   normalization: str = "identity", corpus=None):
    """A tiny real SentencePiece model with StarCoder2's separators as user-defined symbols
    (so SentencePiece matches them in text), one control symbol and a whitespace-run symbol."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus if corpus is not None else _small_corpus(60_000)),
        model_prefix=str(out_prefix), vocab_size=400, model_type=model_type,
        user_defined_symbols=SP_SYMBOLS + [SP_VOCAB_SYMBOL], control_symbols=[SP_CONTROL],
        byte_fallback=byte_fallback, normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != "identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, max_sentence_length=1_000_000, character_coverage=1.0)
    return out_prefix.parent / (out_prefix.name + ".model")


@pytest.mark.parametrize("model_type,normalization", [("bpe", "identity"), ("unigram", "nmt_nfkc")])
def test_sentencepiece_special_text_is_text(tmp_path, model_type, normalization):
    """With parse_special=False no user-defined or control symbol id comes from the text (the
    text decodes back as it was); texts without such strings, and parse_special=True, give
    SentencePiece's own ids exactly."""
    import sentencepiece as spm

    path = train_sp_model(tmp_path / "sp", model_type, normalization=normalization)
    proc = spm.SentencePieceProcessor(model_file=str(path))
    tok = load_tokenizer(path)
    symbol_ids = {proc.piece_to_id(s) for s in SP_SYMBOLS + [SP_CONTROL]} | {proc.eos_id(), proc.bos_id()}
    symbol_ids.add(proc.unk_id())  # byte fallback: nothing is lost as <unk> either
    assert tok.eod == proc.piece_to_id("<|endoftext|>") and tok.special_ids["file_sep"] == proc.piece_to_id("<file_sep>")
    texts = SP_QUOTING + ["x = '\uff1cfim_prefix\uff1e'"]  # NFKC spells <fim_prefix> from full-width forms
    plain = [tok.encode(t, parse_special=False) for t in texts]
    for t, ids in zip(texts, plain):
        assert not symbol_ids & set(ids), (t, proc.id_to_piece(ids))
        assert tok.decode(ids) == tok.decode(proc.encode(t))  # the same text, only not as symbols
        if normalization == "identity":
            assert tok.decode(ids) == t
    assert sum(bool(symbol_ids & set(proc.encode(t))) for t in texts) >= len(texts) - 2  # SentencePiece matches them
    assert tok.encode_batch(texts, parse_special=False) == plain
    assert [a.tolist() for a in tok.encode_batch_np(texts, parse_special=False)] == plain
    # parse_special=True: today's behaviour, SentencePiece's ids exactly
    assert [tok.encode(t) for t in texts] == tok.encode_batch(texts) == proc.encode(texts)
    assert [a.tolist() for a in tok.encode_batch_np(texts, parse_special=True)] == proc.encode(texts)
    # texts holding no symbol string: exactly SentencePiece's ids, vocabulary symbols still matched
    code = _small_corpus(120_000)[-60:] + SNIPPETS[:4] + ["if x:\n\t\tpass\n"]
    want = proc.encode(code)
    assert tok.encode_batch(code, parse_special=False) == want
    assert [tok.encode(t, parse_special=False) for t in code[:10]] == want[:10]
    assert any(proc.piece_to_id(SP_VOCAB_SYMBOL) in ids for ids in want)


def test_sentencepiece_without_byte_fallback_refuses_what_it_cannot_spell(tmp_path):
    """A model lacking a symbol's characters (no byte fallback) would write it as <unk>: a
    one-line DataError instead of lost text; parse_special=True and other texts still work."""
    corpus = [f"def f{i}(x):\n    return x + {i}\n" for i in range(300)]  # no '|', '<', '>'
    path = train_sp_model(tmp_path / "nb", byte_fallback=False, corpus=corpus)
    tok = load_tokenizer(path)
    s = "y = '<|endoftext|>'\n"
    with pytest.raises(DataError, match=r"nb\.model: cannot write '<\|endoftext\|>'.*--parse-special-tokens"):
        tok.encode(s, parse_special=False)
    with pytest.raises(DataError, match="cannot write"):
        tok.encode_batch(["ok", s], parse_special=False)
    assert tok.encode(s) == tok._impl.encode(s) and tok.eod in tok.encode(s)
    assert tok.encode(corpus[0], parse_special=False) == tok._impl.encode(corpus[0])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_special_text_random_mixtures(tmp_path, model_type):
    """Random texts made of symbol strings, their fragments, code and odd characters: each
    decodes back exactly with no symbol id, and parse_special=True still equals SentencePiece."""
    import random

    import sentencepiece as spm

    path = train_sp_model(tmp_path / "sp", model_type)
    proc = spm.SentencePieceProcessor(model_file=str(path))
    tok = load_tokenizer(path)
    symbol_ids = {proc.piece_to_id(s) for s in SP_SYMBOLS + [SP_CONTROL]} | {proc.unk_id()}
    parts = SP_SYMBOLS + [SP_CONTROL, "<", ">", "<fim_", "|>", "<|", "endoftext", " ", "\n", "\t\t", "    ",
                          "def f(x):", "é", "\U0001F600", "\x00", "12"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    plain = tok.encode_batch(texts, parse_special=False)
    for t, ids in zip(texts, plain):
        assert tok.decode(ids) == t and not symbol_ids & set(ids), t
    assert tok.encode_batch(texts) == proc.encode(texts)
    # the reference: SentencePiece itself with a model whose symbol pieces spell text no input holds
    assert plain == _sp_edited(path.read_bytes(), SP_SYMBOLS, absent=True).encode(texts)


def _sp_edited(model: bytes, symbols, absent: bool):
    """The model with `symbols` no longer matchable: renamed to private-use text nobody types
    (absent=True: as if the vocabulary lacked them) or made UNUSED keeping their score."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    for i, piece in enumerate(proto.pieces):
        if piece.piece in symbols:
            if absent:
                piece.piece, piece.type = f"\ue000{i}\ue001", 1  # NORMAL
            else:
                piece.type = 5  # UNUSED
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_sentencepiece_symbol_never_takes_a_merge_from_its_neighbours(tmp_path):
    """BPE forms pieces by score; an unused symbol piece at its own score (0, the highest) would
    be formed before the merges its characters take part in without it, and split back after:
    here '<div' + '>' would lock '>' away from '>\\n'. At the lowest score the ids equal those of a
    model without the symbol; the naive edit does not (so this test can fail)."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["<divx>\n" * 5 + "a >\n b>\n<div>\n"] * 300 + ["x = 1\n"] * 100),
        model_writer=buf, vocab_size=31, model_type="bpe", user_defined_symbols=["<div>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    scores = {"vx": ("<div", -0.1), "div": ("div", -0.05), ">\n": (">\n", -100.0)}  # '<div' early, '>\n' late
    for piece in proto.pieces:
        if piece.piece in scores:
            piece.piece, piece.score = scores[piece.piece]
    (tmp_path / "div.model").write_bytes(proto.SerializeToString())
    tok = load_tokenizer(tmp_path / "div.model")
    model = (tmp_path / "div.model").read_bytes()
    texts = ["<div>\n", "x<div>>\n", " <div>\n<div>"]
    want = _sp_edited(model, ["<div>"], absent=True).encode(texts)
    assert tok.encode_batch(texts, parse_special=False) == want
    assert _sp_edited(model, ["<div>"], absent=False).encode(texts) != want
    assert all(tok.decode(ids) == t for t, ids in zip(texts, want))
