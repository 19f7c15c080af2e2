"""3D parallelism against one process (issue 3).

Each world size is launched once with torchrun (gloo, CPU, one thread per rank) and loops over
its layouts inside (tests/dist/parallel_equivalence.py); each layout trains a tiny StarCoder2
(window 8 < sequence 24) for 5 AdamW steps with gradient clipping and must match a
single-process run of the same model: per-step losses and grad norms within 1e-5 relative,
every gradient before the first optimizer step within 1e-5 of the largest entry, and the
validation loss after training (forward only, with position and document ids) within 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sc2.config import ModelConfig, preset
from megatron_sc2.errors import ConfigError
from megatron_sc2.parallel.layout import ParallelLayout, layout_from_args, split_layers
from megatron_sc2.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "tests" / "dist"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(DIST / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _run_layouts(nproc: int, layouts: list[str]) -> None:
    proc = _torchrun(nproc, "parallel_equivalence.py", layouts, timeout=400)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_layout = {r["layout"]: r for r in results}
    missing = [l for l in layouts if l not in by_layout]
    assert not missing, f"no result for {missing}; stderr tail:\n{proc.stderr[-4000:]}"
    bad = [r for r in results if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)[:6000]
    for r in results:
        assert r["grads_checked"] > 0
        assert r["layout"].startswith("meta.") or ".bf16" in r["layout"] or len(r["losses"]) >= 5
    assert proc.returncode == 0, proc.stderr[-4000:]


# Layout specs: tpN/ppN/dpN sizes, v2 = interleaved schedule with 2 virtual stages per rank,
# sp = sequence parallel, kv1 = one kv head (TP2 replicates it), untied = separate lm_head,
# layers3 = 3 layers on 2 stages (uneven), full/selective = activation recomputation,
# docs = packed documents with --reset-position-ids --reset-attention-mask, cpN = context
# parallel (sequence 24 in N chunks), wN = sliding window N (default 8; w0 = none, causal): CP2
# chunks are 12 (w8 smaller, w16 larger), CP4 chunks 6 (w4 smaller, w8 spans two ranks, w16
# three). CP layouts also check the bytes the halo exchange sent against the analytical volume.
# meta.* layouts instead check shard-by-shard initialization from the meta device (large
# models): replicated parameters and the last stage's tied copy equal across ranks.
# compile = each block torch.compiled (--compile); *.bf16 instead checks --bf16's FSDP policy:
# parameters all-gathered in bf16 inside forward, fp32 shards, gradients and reductions.
WORLD2 = ["tp2", "tp2.sp", "tp2.kv1", "tp2.sp.kv1.untied", "tp2.full", "pp2", "pp2.v2",
          "pp2.layers3.untied", "pp2.selective", "dp2", "pp2.v2.docs", "tp2.sp.docs", "dp2.docs",
          "dp2.selective",
          "meta.tp2.kv1", "meta.pp2",
          "meta.tp2.sp.untied", "dp2.bf16", "dp2.compile", "pp2.compile",
          "cp2", "cp2.w16", "cp2.docs", "cp2.w0", "cp2.docs.compile",
          "cp2.docs.selective"]
WORLD4 = ["tp2.pp2", "tp2.pp2.v2", "tp2.dp2", "pp2.dp2", "pp2.dp2.v2", "tp2.sp.pp2",
          "tp2.kv1.dp2.sp", "tp2.pp2.mbs2.full", "tp2.pp2.dp1.docs.full",
          "cp4", "cp4.w4", "cp4.w16.docs", "cp2.tp2.w16", "cp2.tp2.sp.docs", "cp2.pp2",
          "cp2.pp2.v2.w16.docs", "cp2.dp2", "cp2.dp2.docs.full"]
WORLD8 = ["tp2.pp2.dp2", "tp2.sp.pp2.dp2.v2.untied", "cp2.tp2.sp.pp2.docs"]


def test_equivalence_world2():
    _run_layouts(2, WORLD2)


def test_equivalence_world4():
    _run_layouts(4, WORLD4)


def test_equivalence_world8():
    _run_layouts(8, WORLD8)


def test_rank_failure_ends_the_job_quickly():
    start = time.monotonic()
    proc = _torchrun(2, "rank_failure.py", [], timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 0 step 1" in proc.stdout  # it was training before rank 1 died
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail"


# ------------------------------------------------------------------ layouts and validation

def _layout(world: int, model: str = "starcoder2-tiny", **flags) -> ParallelLayout:
    cfg = TrainConfig(model=model, seq_length=flags.pop("seq_length", 64), **flags)
    return layout_from_args(cfg, world, cfg.model_config())


def test_layout_derives_data_parallel_and_microbatches():
    lay = _layout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                  micro_batch_size=2, global_batch_size=16)
    assert (lay.tp, lay.pp, lay.dp, lay.num_microbatches) == (2, 2, 2, 4)


@pytest.mark.parametrize("flags,world,message", [
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6, "world size 6"),
    (dict(tensor_model_parallel_size=3), 3, "attention heads"),
    (dict(pipeline_model_parallel_size=4, global_batch_size=4), 4, "layers cannot fill"),
    (dict(micro_batch_size=2, global_batch_size=5), 2, "--global-batch-size 5"),
    (dict(pipeline_model_parallel_size=2, global_batch_size=1), 2, "cannot fill"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, seq_length=63), 2, "--seq-length 63"),
    (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3,
          global_batch_size=4), 2, "virtual"),
    (dict(context_parallel_size=3), 3, "--context-parallel-size 3 does not divide --seq-length 64"),
    (dict(context_parallel_size=2, tensor_model_parallel_size=2), 6, "--context-parallel-size 2"),
    (dict(context_parallel_size=0), 1, "--context-parallel-size must be positive"),
    (dict(context_parallel_size=4, tensor_model_parallel_size=4, sequence_parallel=True,
          seq_length=24), 16, "--sequence-parallel needs --seq-length 24"),
])
def test_layout_refuses_impossible_settings(flags, world, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        _layout(world, **flags)


def test_kv_head_replication_rules():
    three_b, seven_b, fifteen_b = preset("starcoder2-3b"), preset("starcoder2-7b"), preset("starcoder2-15b")
    for tp in (1, 2, 4, 8):
        ParallelLayout(tp=tp).validate(three_b)   # 2 kv heads: replicated at TP4/8
        ParallelLayout(tp=tp).validate(fifteen_b)  # 4 kv heads: replicated at TP8
    with pytest.raises(ConfigError, match="does not divide the 36 attention heads"):
        ParallelLayout(tp=8).validate(seven_b)
    with pytest.raises(ConfigError, match="does not divide the 24 attention heads"):
        ParallelLayout(tp=16).validate(three_b)
    # 6 query heads per kv group split over TP3 would straddle kv heads.
    odd = ModelConfig(vocab_size=96, hidden_size=48, ffn_hidden_size=96, num_layers=2,
                      num_attention_heads=12, num_query_groups=2)
    with pytest.raises(ConfigError, match="not a multiple of them"):
        ParallelLayout(tp=3).validate(odd)


def test_uneven_layer_split():
    assert [len(r) for r in split_layers(30, 4)] == [8, 8, 7, 7]
    assert [r.start for r in split_layers(30, 4)] == [0, 8, 16, 23]
    assert [len(r) for r in split_layers(3, 2)] == [2, 1]


# ------------------------------------------------------------------ per-rank parameter counts

def _expected_tp_rank_params(cfg: ModelConfig, tp: int) -> int:
    """Megatron's split, counted by hand: column-parallel weights and biases and the vocab
    are divided by TP; row-parallel biases, LayerNorms and replicated kv projections are not."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    kv = cfg.num_query_groups * d
    kv_params = 2 * (h * kv + kv)
    kv_local = kv_params if tp > cfg.num_query_groups else kv_params // tp
    layer = ((h * h + h) // tp + kv_local + h * h // tp + h   # q, k/v, o (bias replicated)
             + (h * f + f) // tp + f * h // tp + h            # c_fc, c_proj
             + 4 * h)                                          # two LayerNorms
    head = 0 if cfg.tie_word_embeddings else v * h // tp
    return v * h // tp + cfg.num_layers * layer + 2 * h + head


COUNT_CASES = [("starcoder2-3b", 3_030_371_328, 8), ("starcoder2-3b", 3_030_371_328, 4),
               ("starcoder2-15b", 15_957_889_024, 8)]


@pytest.fixture(scope="module")
def meta_counts() -> dict:
    """Per-rank counts of every case, from one subprocess (it needs its own fake world)."""
    code = (
        "import json; from megatron_sc2.config import preset; "
        "from megatron_sc2.parallel.layout import ParallelLayout; "
        "from megatron_sc2.parallel.param_count import parameter_counts_per_rank; "
        f"cases = {[(n, tp) for n, _, tp in COUNT_CASES]!r}; "
        "print(json.dumps([parameter_counts_per_rank(preset(n), ParallelLayout(tp=tp)) "
        "for n, tp in cases]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(n, tp): c for (n, _, tp), c in zip(COUNT_CASES, out)}


@pytest.mark.parametrize("name,total,tp", COUNT_CASES)
def test_meta_param_counts(meta_counts, name, total, tp):
    counts = meta_counts[(name, tp)]
    cfg = preset(name)
    assert cfg.num_params() == total
    assert counts == [_expected_tp_rank_params(cfg, tp)] * tp
    # Sharded parts add up to the model; replicated parts are held by every rank.
    h, kv = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim
    replicated_per_layer = 2 * h + 4 * h + (2 * (h * kv + kv) if cfg.num_query_groups < tp else 0)
    replicated = cfg.num_layers * replicated_per_layer + 2 * h
    assert sum(counts) - (tp - 1) * replicated == total


def test_context_parallel_refuses_an_unknown_attention_backend(monkeypatch):
    monkeypatch.setenv("MEGATRON_SC2_ATTENTION", "flash3")
    with pytest.raises(ConfigError, match="--context-parallel-size needs an attention backend"):
        _layout(2, context_parallel_size=2)
    _layout(2)  # without CP the variable is not this check's business


@pytest.mark.parametrize("window", [None, 1, 2, 5, 6, 7, 13, 24, 100])
def test_halo_plan_covers_exactly_the_visible_keys_before_each_chunk(window):
    """Brute force: the positions a rank receives are exactly those before its chunk that some
    query of the chunk may see (i - w < j <= i), each once, from its owner."""
    from megatron_sc2.parallel.context_parallel import halo_plan

    size, chunk = 4, 6
    plans = [halo_plan(r, size, chunk, window) for r in range(size)]
    for r in range(size):
        start = r * chunk
        want = sorted({j for i in range(start, start + chunk) for j in range(start)
                       if window is None or j > i - window})
        got, offset = [], 0
        for src, first, n in plans[r][1]:
            assert first == offset  # the halo is filled in order, without gaps
            offset += n
            sends = [(a, m) for dst, a, m in plans[src][0] if dst == r]
            assert sends and sends[0][1] == n  # the owner sends what the receiver expects
            got += [src * chunk + sends[0][0] + t for t in range(n)]
        assert got == want, (r, window)
