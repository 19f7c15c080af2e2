"""Training samples against megatron-core: GPTDataset/BlendedDataset sample for sample,
get_batch against `_get_ltor_masks_and_position_ids`, exact blends, stale-cache detection."""

from __future__ import annotations

import os
import types
import warnings

import numpy as np
import pytest
import torch

from megatron_sc2.config import TrainConfig
from megatron_sc2.data import build_train_valid_test_datasets
from megatron_sc2.data.batch import get_batch
from megatron_sc2.data.blending import build_blending_indices, build_blending_indices_py
from megatron_sc2.data.indexed import write_documents
from megatron_sc2.errors import ConfigError, DataError


class _Tok:
    vocab_size = 512
    eod = 0
    special_ids = {"eod": 0}


def _make(prefix, n_docs, seed, vocab=500):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, size=int(rng.integers(1, 120))).tolist() + [0] for _ in range(n_docs)]
    write_documents(prefix, docs, np.uint16)
    return str(prefix)


def _megatron_build(data_path, split, seq, seed, ns, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.utils import get_blend_from_list
    tok = types.SimpleNamespace(eod=0, pad=-1, vocab_size=512, unique_identifiers={"t": 1})
    cfg = GPTDatasetConfig(random_seed=seed, sequence_length=seq, blend=get_blend_from_list(data_path),
                           split=split, tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, path_to_cache=cache)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(ns), lambda: True, cfg).build()


@pytest.mark.parametrize("blend", ["single", "weighted", "unweighted"])
def test_samples_equal_megatron_core(tmp_path, blend):
    a = _make(tmp_path / "a", 300, 0)
    b = _make(tmp_path / "b", 200, 1)
    data_path = {"single": [a], "weighted": ["0.3", a, "0.7", b], "unweighted": [a, b]}[blend]
    # Ask for more samples than one epoch holds so several epochs (and the final-epoch rule) are used.
    ns = (1500, 40, 12)
    cfg = TrainConfig(data_path=data_path, split="90,8,2", seq_length=32, seed=7,
                      data_cache_path=str(tmp_path / "cache"))
    ours = build_train_valid_test_datasets(cfg, _Tok(), ns)
    theirs = _megatron_build(data_path, "90,8,2", 32, 7, ns, str(tmp_path / "mcache") if blend == "single" else None)
    for o, t, n in zip(ours, theirs, ns):
        assert len(o) == len(t)
        for i in range(min(n, len(t))):
            m = t[i]
            ref = np.concatenate([m["tokens"].numpy(), m["labels"].numpy()[-1:]])
            assert np.array_equal(ref, o[i]), f"sample {i} differs"
    # A second build loads the cached indices and gives the same samples.
    again = build_train_valid_test_datasets(cfg, _Tok(), ns)
    for o, p in zip(ours, again):
        assert all(np.array_equal(o[i], p[i]) for i in range(0, len(p), 7))


def test_get_batch_matches_megatron():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 6, (4, 41), generator=g)  # id 0 = eod, frequent
    samples[0, :] = 3  # a row without any eod
    for rpi in (False, True):
        for ram in (False, True):
            for eml in (False, True):
                out = get_batch(samples, 0, rpi, ram, eml)
                assert torch.equal(out["tokens"], samples[:, :-1]) and torch.equal(out["labels"], samples[:, 1:])
                for b in range(samples.shape[0]):
                    mask, loss_mask, pos = _get_ltor_masks_and_position_ids(
                        out["tokens"][b].clone(), 0, rpi, ram, eml, True)
                    assert torch.equal(out["loss_mask"][b], loss_mask)
                    assert torch.equal(out["position_ids"][b], pos)
                    if ram:
                        d = out["document_ids"][b]
                        s = d.shape[0]
                        causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
                        allowed = causal & (d[:, None] == d[None, :])
                        assert torch.equal(allowed, ~mask[0])
                    else:
                        assert out["document_ids"] is None


def test_blend_proportions_exact():
    weights = [0.2, 0.5, 0.3]
    idx, sample_idx = build_blending_indices(weights, 10_000)
    py_idx, py_sample_idx = build_blending_indices_py(weights, 10_000)
    assert np.array_equal(idx, py_idx) and np.array_equal(sample_idx, py_sample_idx)
    counts = np.zeros(3)
    for i, d in enumerate(idx, start=1):
        counts[d] += 1
        # every prefix is within one sample of the exact proportion
        assert np.all(np.abs(counts - np.asarray(weights) * i) <= 1.0 + 1e-9)
    # the sample index of each dataset counts up from 0 without gaps
    for d in range(3):
        assert np.array_equal(sample_idx[idx == d], np.arange((idx == d).sum()))


def test_stale_cache_is_not_reused(tmp_path):
    prefix = _make(tmp_path / "a", 100, 0)
    cfg = TrainConfig(data_path=[prefix], split="1,0,0", seq_length=16, seed=3,
                      data_cache_path=str(tmp_path / "cache"))
    first = build_train_valid_test_datasets(cfg, _Tok(), (50, 0, 0))[0]
    entries = sorted(os.listdir(tmp_path / "cache"))
    build_train_valid_test_datasets(cfg, _Tok(), (50, 0, 0))
    assert sorted(os.listdir(tmp_path / "cache")) == entries  # unchanged data: cache hit
    # Remake the dataset under the same name with other documents.
    _make(tmp_path / "a", 140, 5)
    second = build_train_valid_test_datasets(cfg, _Tok(), (50, 0, 0))[0]
    fresh = build_train_valid_test_datasets(
        TrainConfig(data_path=[prefix], split="1,0,0", seq_length=16, seed=3), _Tok(), (50, 0, 0))[0]
    assert len(os.listdir(tmp_path / "cache")) > len(entries)
    assert all(np.array_equal(second[i], fresh[i]) for i in range(50))
    assert not all(np.array_equal(first[i], second[i]) for i in range(50))
    # Every option that moves sample boundaries changes the key.
    build_train_valid_test_datasets(TrainConfig(data_path=[prefix], split="1,0,0", seq_length=17, seed=3,
                                                data_cache_path=str(tmp_path / "cache")), _Tok(), (50, 0, 0))
    assert len(os.listdir(tmp_path / "cache")) > len(entries) + 4


def test_dataset_errors(tmp_path):
    prefix = _make(tmp_path / "a", 20, 0, vocab=1000)
    cfg = TrainConfig(data_path=[prefix], split="1,0,0", seq_length=16)
    with pytest.raises(DataError, match="beyond the vocabulary"):
        build_train_valid_test_datasets(cfg, _Tok(), (5, 0, 0))
    small = _make(tmp_path / "b", 20, 0)
    cfg = TrainConfig(data_path=[small], split="100,0,0", seq_length=16)
    assert build_train_valid_test_datasets(cfg, _Tok(), (5, 3, 0))[1] is None
    with pytest.raises(ConfigError, match="--split"):
        build_train_valid_test_datasets(TrainConfig(data_path=[small], split="a,b"), _Tok(), (5, 0, 0))
    with pytest.raises(DataError, match="not found"):
        build_train_valid_test_datasets(TrainConfig(data_path=[str(tmp_path / "nope")]), _Tok(), (5, 0, 0))
    blend_file = tmp_path / "blend.txt"
    blend_file.write_text(f"# weights\n0.5 {small}\n0.5 {small}\n")
    ds = build_train_valid_test_datasets(TrainConfig(data_path=[str(blend_file)], split="1,0,0", seq_length=16),
                                         _Tok(), (9, 0, 0))[0]
    assert len(ds) == 10  # Megatron sizes a blend as the sum of ceil(n * weight)


def test_per_split_data_paths(tmp_path):
    a = _make(tmp_path / "a", 50, 0)
    b = _make(tmp_path / "b", 40, 1)
    cfg = TrainConfig(train_data_path=["0.5", a, "0.5", b], valid_data_path=[b], seq_length=16, seed=2,
                      data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(cfg, _Tok(), (30, 10, 5))
    assert test is None and len(train) >= 30 and len(valid) >= 10
    # the valid split is the whole of b: its samples equal a plain single-dataset build
    whole_b = build_train_valid_test_datasets(
        TrainConfig(data_path=[b], split="1,0,0", seq_length=16, seed=2), _Tok(), (10, 0, 0))[0]
    assert all(np.array_equal(valid[i], whole_b[i]) for i in range(10))
    counts = np.bincount(train.dataset_index, minlength=2)
    assert abs(counts[0] - counts[1]) <= 1


def _rank_worker(rank: int, world: int, init_file: str, prefix: str, cache: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megatron_sc2.data import gpt_dataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    real = gpt_dataset.build_indices

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    gpt_dataset.build_indices = counting
    cfg = TrainConfig(data_path=[prefix], split="90,10,0", seq_length=16, seed=9, data_cache_path=cache)
    train, valid, _ = build_train_valid_test_datasets(cfg, _Tok(), (64, 8, 0))
    np.save(f"{out_dir}/rank{rank}.npy", np.stack([train[i] for i in range(64)] + [valid[i] for i in range(8)]))
    np.save(f"{out_dir}/calls{rank}.npy", np.asarray([len(calls)]))
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_builds_others_load(tmp_path):
    import torch.multiprocessing as mp

    prefix = _make(tmp_path / "a", 120, 4)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), prefix, str(tmp_path / "cache"), str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert np.array_equal(r0, r1)
    assert int(np.load(tmp_path / "calls0.npy")[0]) == 2  # train and valid indices built once, by rank 0
    assert int(np.load(tmp_path / "calls1.npy")[0]) == 0  # rank 1 loaded them from the cache
    single = build_train_valid_test_datasets(
        TrainConfig(data_path=[prefix], split="90,10,0", seq_length=16, seed=9), _Tok(), (64, 8, 0))
    assert np.array_equal(r0[:64], np.stack([single[0][i] for i in range(64)]))
