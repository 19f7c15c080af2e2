"""The layout planner (`megatron-sc2 plan`): its memory model against PyTorch's own accounting of
the same step under fake tensors (MemTracker, planning/memory_trace.py) at the real 3B/7B/15B
shapes, its layouts against parallel/layout.py's rules, its command's output and errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from megatron_sc2 import cli
from megatron_sc2.config import parse_train_args, preset
from megatron_sc2.errors import ConfigError
from megatron_sc2.planning import planner
from megatron_sc2.planning.memory_trace import trace_in_subprocess

H100 = planner.GPUS["h100-80gb"]


def _proposed(model: str, seq: int, pick) -> planner.Layout:
    plans = planner.plan(preset(model), seq, 64, H100)
    return next(p.layout for p in plans if p.fits and pick(p.layout))


def _traceable(lay: planner.Layout) -> planner.Layout:
    """The same layout with a short step: memory depends on the number of micro-batches only
    through 'one or several' (pp = 1) and 'fills the pipeline' (pp > 1)."""
    n_mb = lay.pp if lay.pp > 1 else min(lay.num_microbatches, 2)
    return dataclasses.replace(lay, global_batch_size=n_mb * lay.micro_batch_size * lay.dp)


# The layouts the planner proposes on 64 H100s, one per preset (bench/plan.py checks more): its
# best with tensor parallelism, its best overall without CP or virtual stages (the tracer drives
# neither). Layers cut to one per pipeline stage (two without a pipeline): every per-layer term of
# the model is linear in the layer count.
CASES = [("starcoder2-3b", 16384, lambda l: l.cp == 1 and l.tp > 1 and l.virtual_stages == 1),
         ("starcoder2-7b", 4096, lambda l: l.cp == 1 and l.virtual_stages == 1),
         ("starcoder2-15b", 4096, lambda l: l.cp == 1 and l.virtual_stages == 1)]


def traced_and_estimated(model: str, seq: int, pick) -> tuple[planner.Layout, int, int]:
    lay = _traceable(_proposed(model, seq, pick))
    cfg = dataclasses.replace(preset(model), num_layers=lay.pp if lay.pp > 1 else 2)
    stages = ("first", "last") if lay.pp > 1 else ("first",)
    traced = max(trace_in_subprocess(cfg, lay.parallel_layout(), seq, s).peak for s in stages)
    return lay, planner.estimate_memory(cfg, lay, seq).total, traced


@pytest.mark.parametrize("model,seq,pick", CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_memory_model_within_10_percent_of_fake_tensor_tracker(model, seq, pick):
    lay, estimate, traced = traced_and_estimated(model, seq, pick)
    assert abs(estimate - traced) <= 0.10 * traced, (lay.describe(), estimate / traced)


def test_parameter_count_matches_the_engine_shards():
    from megatron_sc2.parallel.layout import ParallelLayout
    from megatron_sc2.parallel.param_count import parameter_counts_per_rank

    for model, tp, pp in (("starcoder2-15b", 8, 2), ("starcoder2-3b", 4, 2)):
        cfg = dataclasses.replace(preset(model), num_layers=4)
        counts = parameter_counts_per_rank(cfg, ParallelLayout(tp=tp, pp=pp))
        shapes = planner.stage_shapes(cfg, tp, pp)
        assert [s.params for s in shapes] == [counts[0], counts[(pp - 1) * tp]]


def test_every_layout_obeys_the_layout_rules_and_fits_best_first():
    cfg = preset("starcoder2-15b")
    plans = planner.plan(cfg, 16384, 64, H100)
    assert plans and all(p.layout.world_size == 64 for p in plans)
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True)        # fitting layouts first
    times = [p.step_time_s for p in plans if p.fits]
    assert times == sorted(times)
    for p in plans[:50]:
        lay = p.layout
        lay.parallel_layout().validate(cfg, 16384 // lay.cp)
        assert 16384 % lay.cp == 0 and cfg.num_attention_heads % lay.tp == 0
        assert p.fits == (p.memory.total <= planner.usable_bytes(H100))
    # selective recomputation is proposed with data and context parallelism (dp2.selective and
    # cp2.docs.selective equal one process in test_parallel)
    assert any(p.layout.recompute == "selective" and p.layout.dp > 1 for p in plans)
    assert any(p.layout.recompute == "selective" and p.layout.cp > 1 for p in plans)


def test_halo_is_the_window_not_the_sequence():
    cfg = preset("starcoder2-15b")
    # 16k at CP4, window 4096: 4,095 positions from the preceding rank (not 12,288 from all).
    assert planner._halo_tokens(cfg, 16384, 4) == 4095
    assert planner.halo_bytes_per_layer(cfg, 16384, 4, tp=1) == 2 * 2 * 4 * 128 * 4095
    causal = dataclasses.replace(cfg, sliding_window=None)
    assert planner._halo_tokens(causal, 16384, 4) == 16384 - 4096


def test_cp_attention_memory_counts_the_halo_only_on_keys_and_per_sample():
    # The kernel takes the chunk's L queries against [halo, chunk]: only K/V grow by the halo
    # (bf16, kv heads x head dim each), not q, o or the log-sum-exp; and each sample of a
    # micro-batch brings its own halo, so CP activations are linear in the micro-batch.
    cfg = preset("starcoder2-7b")
    halo = planner._halo_tokens(cfg, 16384, 4)
    grow = (planner.layer_activation_bytes(cfg, 4096, 1, False, None, halo)
            - planner.layer_activation_bytes(cfg, 4096, 1, False, None, 0))
    assert grow == 2 * 2 * cfg.num_query_groups * cfg.head_dim * halo
    one, two = (planner.estimate_memory(cfg, planner.Layout(tp=1, pp=1, dp=1, cp=4,
                                                            micro_batch_size=m,
                                                            global_batch_size=m), 16384)
                for m in (1, 2))
    assert two.activations == 2 * one.activations


def test_plan_command_prints_table_and_writes_a_config_train_reads(tmp_path, capsys):
    out = tmp_path / "run.yaml"
    assert cli.main(["plan", "--model", "starcoder2-7b", "--seq-length", "16384", "--gpus", "64",
                     "--gpu", "h100-80gb", "--rotary-base", "1e7", "--write-config", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TP" in text and "MFU" in text and "planned only" not in text
    data = yaml.safe_load(out.read_text())
    cfg = parse_train_args(["--config", str(out), "--mock-data"])
    assert cfg.context_parallel_size == data.get("context_parallel_size", 1)
    assert (cfg.seq_length, cfg.rotary_base, cfg.model) == (16384, 1e7, "starcoder2-7b")
    # ... and `megatron-sc2 submit --config` takes it for the 64 GPUs it was planned for
    from megatron_sc2.launch.submit import build

    spec, sub, _ = build(["--config", str(out), "--nodes", "8", "--gpus-per-node", "8",
                          "--dry-run", "--", "--mock-data", "--save", str(tmp_path / "ck")])
    assert spec.nodes * spec.tasks_per_node == 64
    assert sub.tensor_model_parallel_size == data["tensor_model_parallel_size"]


def test_a_cp_layout_is_written_and_train_takes_it(tmp_path, capsys):
    from megatron_sc2.parallel.layout import layout_from_args

    out = tmp_path / "cp.yaml"
    assert cli.main(["plan", "--model", "starcoder2-3b", "--seq-length", "16384", "--gpus", "64",
                     "--context-parallel-size", "4", "--write-config", str(out), "--pick", "1"]) == 0
    assert "planned only" not in out.read_text()
    assert yaml.safe_load(out.read_text())["context_parallel_size"] == 4
    cfg = parse_train_args(["--config", str(out), "--mock-data"])
    layout = layout_from_args(cfg, 64, cfg.model_config())
    assert layout.cp == 4 and layout.world_size == 64


@pytest.mark.parametrize("argv,flag", [
    (["--context-parallel-size", "3"], "--context-parallel-size 3 does not divide --seq-length"),
    (["--context-parallel-size", "4", "--tensor-model-parallel-size", "8",
      "--pipeline-model-parallel-size", "4"], "does not divide --gpus 64"),
    (["--tensor-model-parallel-size", "5"], "--tensor-model-parallel-size 5"),
    (["--gpu", "tpu-v5"], "--gpu 'tpu-v5'"),
])
def test_bad_settings_are_one_line_naming_the_flag(argv, flag, capsys):
    rc = cli.main(["plan", "--model", "starcoder2-15b", "--seq-length", "16384", "--gpus", "64", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and flag in err


def test_nothing_fits_is_one_line(capsys):
    rc = cli.main(["plan", "--model", "starcoder2-15b", "--seq-length", "16384", "--gpus", "1",
                   "--gpu", "a100-40gb"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no layout" in err and len(err.splitlines()) == 1
