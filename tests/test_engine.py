"""One process goes through the engine like every parallel layout (tests/test_parallel.py holds
the layouts): the trainer's step and validation against the plain model and torch's
cross-entropy, recomputation in one process, and the loader's batches and order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_sc2.config import ModelConfig, parse_train_args
from megatron_sc2.data.batch import get_batch
from megatron_sc2.data.loader import BatchLoader, BatchPlan
from megatron_sc2.data.mock_data import MockDataset
from megatron_sc2.model import StarCoder2
from megatron_sc2.parallel.engine import Engine
from megatron_sc2.parallel.layout import ParallelLayout
from megatron_sc2.training.trainer import Trainer

CFG = ModelConfig(vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=3,
                  num_attention_heads=4, num_query_groups=2, max_position_embeddings=64,
                  sliding_window=8, rope_theta=10000.0, init_method_std=0.05).validate()


def _docs_batch(seed: int = 3, batch: int = 4, seq: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, CFG.vocab_size, (batch, seq + 1), generator=g)
    t[torch.rand(t.shape, generator=g) < 0.2] = 0
    return get_batch(t, 0, reset_position_ids=True, reset_attention_mask=True)


def _plain_loss(model: StarCoder2, b: dict, docs: bool = True) -> torch.Tensor:
    logits = model(b["tokens"], position_ids=b["position_ids"] if docs else None,
                   document_ids=b["document_ids"] if docs else None)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))


@pytest.mark.usefixtures("one_process")
def test_one_process_trainer_steps_and_validates_through_the_engine(tmp_path):
    """A one-process trainer holds an Engine of layout 1x1x1 whose chunk is the plain model;
    its first loss is torch's cross-entropy of that model on the first global batch, and its
    validation loss is the model's on the validation samples with position and document ids
    (the bug of issue 11: the parallel path dropped them)."""
    argv = ["--model", "starcoder2-tiny", "--mock-data", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
            "--lr", "1e-3", "--eval-interval", "2", "--eval-iters", "2", "--seed", "9",
            "--reset-position-ids", "--reset-attention-mask", "--log-dir", str(tmp_path)]
    trainer = Trainer(parse_train_args(argv))
    assert isinstance(trainer.engine, Engine) and trainer.engine.layout.world_size == 1
    assert trainer.engine.chunks == [trainer.model] and isinstance(trainer.model, StarCoder2)
    ref = StarCoder2(trainer.model_cfg)
    ref.load_state_dict(trainer.model.state_dict())
    train_ds = MockDataset(trainer.model_cfg.vocab_size, 32, 9)
    first = get_batch(torch.from_numpy(np.stack([train_ds[i] for i in range(4)])), 0, True, True)
    with torch.no_grad():
        expect_first = float(_plain_loss(ref, first))
    records = trainer.train()
    assert abs(records[0]["loss"] - expect_first) <= 1e-6 * expect_first

    valid_ds = MockDataset(trainer.model_cfg.vocab_size, 32, 10)
    vb = get_batch(torch.from_numpy(np.stack([valid_ds[i] for i in range(8)])), 0, True, True)
    with torch.no_grad():
        expect = float(_plain_loss(trainer.model, vb))
        ignoring_docs = float(_plain_loss(trainer.model, vb, docs=False))
    got = records[-1]["valid_loss"]
    assert abs(got - expect) <= 1e-5 * expect, (got, expect)
    # The ids matter: ignoring them is ten times the tolerance off, so the comparison can fail.
    assert abs(ignoring_docs - expect) > 10 * 1e-5 * expect


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_in_one_process_gives_the_same_loss_and_gradients(granularity):
    b = _docs_batch()
    runs = {}
    for rc in (None, granularity):
        torch.manual_seed(0)
        layout = ParallelLayout(micro_batch_size=2, global_batch_size=4, recompute_granularity=rc)
        engine = Engine.build(CFG, layout, None, model=StarCoder2(CFG))
        calls = {"q_proj": 0, "c_fc": 0}
        layer = engine.rank_model.layers["1"]
        for name, mod in (("q_proj", layer.self_attn.q_proj), ("c_fc", layer.mlp.c_fc)):
            mod.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        loss, norm = engine.train_step(b, clip_grad=0.0)
        grads = {n: p.grad.clone() for n, p in engine.rank_model.named_parameters()}
        runs[rc] = (float(loss), float(norm), grads, dict(calls))
    (l0, n0, g0, c0), (l1, n1, g1, c1) = runs[None], runs[granularity]
    assert l0 == pytest.approx(l1, rel=1e-6) and n0 == pytest.approx(n1, rel=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)
    # It did recompute: two micro-batches, each forward run again in backward.
    assert c0 == {"q_proj": 2, "c_fc": 2}
    assert c1 == {"q_proj": 4, "c_fc": 4 if granularity == "full" else 2}
    # Evaluation (no grad) runs each block once.
    torch.manual_seed(0)
    layout = ParallelLayout(micro_batch_size=2, global_batch_size=4, recompute_granularity=granularity)
    engine = Engine.build(CFG, layout, None, model=StarCoder2(CFG))
    valid, tokens = engine.evaluate(b)
    with torch.no_grad():
        torch.manual_seed(0)
        expect = float(_plain_loss(StarCoder2(CFG), b))
    assert float(valid) == pytest.approx(expect, rel=1e-6) and float(tokens) == b["labels"].numel()


class _Indexed:
    """Sample i is the token i repeated: the loaded rows name the samples they came from."""

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(9, i, dtype=np.int64)


def test_loader_takes_megatron_order_and_prefetching_changes_nothing():
    # Rank 1 of DP2, micro-batches of 2, 2 per step: micro-batch m holds samples
    # first + 4m + 2 .. first + 4m + 3 (Megatron's order), one after the other.
    plan = BatchPlan(micro_batch_size=2, num_micro_batches=2, dp_rank=1, dp_size=2, eod=-1)
    assert plan.sample_indices(8) == [10, 11, 14, 15]
    loader = BatchLoader(_Indexed(), plan, torch.device("cpu"), num_workers=0)
    assert loader.get(8)["tokens"][:, 0].tolist() == [10, 11, 14, 15]
    # The two ranks together take each sample of the global batch exactly once.
    both = sorted(BatchPlan(2, 2, r, 2, -1).sample_indices(16)[k] for r in (0, 1) for k in range(4))
    assert both == list(range(16, 24))
    # Same batches, same order, with and without background workers (a real dataset; the
    # first steps, then a jump as after a resume).
    ds = MockDataset(512, 32, 4)
    plan = dataclasses.replace(plan, eod=0, reset_position_ids=True, reset_attention_mask=True)
    order = [0, 8, 16, 24, 72, 80]
    seen = {}
    for workers in (0, 1, 3):
        loader = BatchLoader(ds, plan, torch.device("cpu"), num_workers=workers)
        seen[workers] = [loader.get(f, order[i + 1] if i + 1 < len(order) else None)
                         for i, f in enumerate(order)]
        loader.close()
    for workers in (1, 3):
        for a, b in zip(seen[0], seen[workers]):
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), (workers, k)
    expect = get_batch(torch.from_numpy(np.stack([ds[i] for i in (74, 75, 78, 79)])), 0, True, True)
    assert torch.equal(seen[3][4]["tokens"], expect["tokens"])
    assert torch.equal(seen[3][4]["document_ids"], expect["document_ids"])


def test_model_init_and_shard_by_shard_init_follow_one_rule():
    """parallel/init.py (large models, each rank its own shards) and the model's own init draw
    different numbers by the same per-parameter rule: equal constants (LayerNorms, biases),
    equal spreads (output projections 1/sqrt(2 x layers) narrower)."""
    from megatron_sc2.parallel.init import materialize

    cfg = dataclasses.replace(CFG, hidden_size=64, ffn_hidden_size=256, num_layers=8)
    torch.manual_seed(0)
    whole = {n: p.detach() for n, p in StarCoder2(cfg).named_parameters()}
    with torch.device("meta"):
        meta = StarCoder2(cfg)
    materialize(meta, cfg, torch.device("cpu"), seed=3)
    assert torch.equal(meta.lm_head.weight, meta.embed_tokens.weight)  # tied: the same draw
    meta.lm_head.weight = meta.embed_tokens.weight  # allocation untied them; the engine re-ties
    sharded = {n: p.detach() for n, p in meta.named_parameters()}
    assert whole.keys() == sharded.keys()
    for name, a in whole.items():
        b = sharded[name]
        if a.std() == 0:
            assert torch.equal(a, b), name
        else:
            assert 0.85 < float(b.std() / a.std()) < 1.15, name
            assert not torch.equal(a, b), name
    out = float(whole["layers.0.self_attn.o_proj.weight"].std())
    plain = float(whole["layers.0.self_attn.q_proj.weight"].std())
    assert out == pytest.approx(plain / 4.0, rel=0.15)  # 1/sqrt(2 x 8 layers)
