"""FIM: every transformed chunk is a valid PSM/SPM rearrangement of the original text
(property test over real packed samples), `<repo_name>` parts are untouched, and samples are
a pure function of (seed, sample index): equal across rebuilds, access orders and workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sc2.config import TrainConfig
from megatron_sc2.data import build_train_valid_test_datasets
from megatron_sc2.data.prep.corpus import iter_stdlib_repositories
from megatron_sc2.data.fim import FimIds, _split_keep
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.data.prep.train_tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small trained tokenizer and the repository documents of a slice of the stdlib."""
    root = tmp_path_factory.mktemp("fim")
    repos = []
    size = 0
    for name, files in iter_stdlib_repositories():
        files = [f for f in files if len(f[1]) < 6000][:4]
        if files:
            repos.append((name, files))
            size += sum(len(t) for _, t in files)
        if size > 300_000:
            break
    train_tokenizer((t for _, fs in repos for _, t in fs), 1000, root / "tok")
    tok = load_tokenizer(root / "tok")
    preprocess(str(root / "repos"), tok, repositories=repos, progress=False)
    return tok, str(root / "repos_text_document")


def _cfg(prefix, **kw):
    base = dict(data_path=[prefix], split="1,0,0", seq_length=256, seed=11, fim_rate=0.5, fim_spm_rate=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _check_chunk(tok, ids: FimIds, orig: list[int], new: list[int]) -> str:
    """'same', 'psm' or 'spm' after checking that `new` rearranges `orig`."""
    if new == orig:
        return "same"
    text = tok.decode(orig)
    assert new[0] == ids.prefix, "a changed chunk must start with <fim_prefix>"
    if new[1] == ids.suffix:  # SPM: <P><S> suf <M> pre mid
        m = new.index(ids.middle)
        suf, pre_mid = tok.decode(new[2:m]), tok.decode(new[m + 1:])
        assert text.startswith(pre_mid)
        assert text[len(pre_mid):].startswith(suf)
        kind = "spm"
    else:  # PSM: <P> pre <S> suf <M> mid
        s, m = new.index(ids.suffix), new.index(ids.middle)
        pre, suf, mid = tok.decode(new[1:s]), tok.decode(new[s + 1:m]), tok.decode(new[m + 1:])
        assert text.startswith(pre + mid)
        assert text[len(pre + mid):].startswith(suf)
        kind = "psm"
    # only the end of the suffix may be given up, and only to keep the length
    assert len(new) <= len(orig)
    for special in (ids.eod, ids.file_sep, ids.repo_name):
        assert special not in new
    return kind


def test_fim_chunks_are_valid_rearrangements(corpus):
    tok, prefix = corpus
    ids = FimIds.from_tokenizer(tok)
    plain = build_train_valid_test_datasets(_cfg(prefix, fim_rate=0.0), tok, (60, 0, 0))[0]
    fim = build_train_valid_test_datasets(_cfg(prefix, fim_rate=0.9), tok, (60, 0, 0))[0]
    kinds = {"same": 0, "psm": 0, "spm": 0}
    repo_heads = 0
    for i in range(60):
        a, b = plain[i].tolist(), fim[i].tolist()
        assert len(b) == len(a) == 257
        while b and b[-1] == ids.pad:
            b.pop()
        docs_a, docs_b = _split_keep(a, ids.eod), _split_keep(b, ids.eod)
        assert len(docs_a) == len(docs_b)
        for da, db in zip(docs_a, docs_b):
            ca, cb = _split_keep(da, ids.file_sep), _split_keep(db, ids.file_sep)
            assert len(ca) == len(cb)
            for k, (x, y) in enumerate(zip(ca, cb)):
                if k == 0 and x and x[0] == ids.repo_name:
                    assert x == y, "<repo_name> parts are never transformed"
                    repo_heads += 1
                    continue
                kinds[_check_chunk(tok, ids, x, y)] += 1
    assert kinds["psm"] > 5 and kinds["spm"] > 5 and kinds["same"] > 5 and repo_heads > 0, kinds


def test_fim_is_a_pure_function_of_seed_and_index(corpus):
    tok, prefix = corpus
    first = build_train_valid_test_datasets(_cfg(prefix), tok, (40, 0, 0))[0]
    want = [first[i] for i in range(40)]
    # a rebuilt dataset (a resumed run), read in another order
    again = build_train_valid_test_datasets(_cfg(prefix), tok, (40, 0, 0))[0]
    for i in reversed(range(40)):
        assert np.array_equal(again[i], want[i])
    # worker processes of a DataLoader
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(again, range(40)), batch_size=4, num_workers=2)
    got = torch.cat([b for b in loader]).numpy()
    assert np.array_equal(got, np.stack(want))
    # another seed gives other samples; FIM actually changed something
    other = build_train_valid_test_datasets(_cfg(prefix, seed=12), tok, (40, 0, 0))[0]
    assert any(not np.array_equal(other[i], want[i]) for i in range(40))
    plain = build_train_valid_test_datasets(_cfg(prefix, fim_rate=0.0), tok, (40, 0, 0))[0]
    assert sum(not np.array_equal(plain[i], want[i]) for i in range(40)) > 10
