"""The planner's memory model against PyTorch's fake-tensor accounting (MemTracker) of the same
step, at more layouts than tests/test_planner.py: every preset at 4k and 16k, the planner's best
layout without CP/virtual stages and its best with TP. Prints estimate / traced per layout.

    PYTHONPATH=$PWD python bench/plan.py             # estimate vs fake-tensor tracker
    PYTHONPATH=$PWD python bench/plan.py --measured  # estimate vs tracker vs a real CPU step
    PYTHONPATH=$PWD python bench/plan.py --slope     # per-layer growth: the extrapolation
    PYTHONPATH=$PWD python bench/plan.py --by-hand   # recomputation, interleaved first rank
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_planner import traced_and_estimated  # noqa: E402

GIB = 2 ** 30
RULES = {"best": lambda l: l.cp == 1 and l.virtual_stages == 1,
         "best with TP": lambda l: l.cp == 1 and l.tp > 1 and l.virtual_stages == 1}

if __name__ == "__main__" and not {"--measured", "--slope", "--by-hand"} & set(sys.argv):
    for model in ("starcoder2-3b", "starcoder2-7b", "starcoder2-15b"):
        for seq in (4096, 16384):
            for name, rule in RULES.items():
                try:
                    lay, est, traced = traced_and_estimated(model, seq, rule)
                    print(f"{model:15} {seq:>6} {name:13} {lay.describe():26} "
                          f"mbs {lay.micro_batch_size} {lay.recompute or '-':9} "
                          f"traced {traced / GIB:6.2f} GiB  estimate {est / GIB:6.2f} GiB  "
                          f"ratio {est / traced:.3f}", flush=True)
                except RuntimeError as e:
                    print(f"{model:15} {seq:>6} {name:13} trace failed: {e}", flush=True)


# ------------------------------------------------------------------ measured peaks of CPU runs

_MEASURE = r'''
import json, os, sys
import torch
from megatron_sc2.config import ModelConfig, TrainConfig
from megatron_sc2.model.starcoder2 import StarCoder2
from megatron_sc2.training.optimizer import build_optimizer
import torch.nn.functional as F

spec = json.loads(sys.stdin.read())
cfg = ModelConfig(**spec["cfg"])
torch.manual_seed(0)
model = StarCoder2(cfg)
opt = build_optimizer([model], TrainConfig())
tokens = torch.randint(1, cfg.vocab_size, (spec["mbs"], spec["seq"]))
mask = torch.ones_like(tokens)

def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = (F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                reduction="none") * mask.reshape(-1)).sum() / tokens.numel()
        del logits
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
step()                                   # optimizer state now exists, every kernel is loaded
live = sum(p.numel() * p.element_size() for p in model.parameters())
live += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
            if torch.is_tensor(t))
live += tokens.numel() * 8 * 2
base = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                         # reset the peak resident set size (VmHWM)
step()
print(json.dumps({"peak": live + rss("VmHWM:") - base}))
'''


def measured_cpu_peak(cfg, seq: int, mbs: int) -> int:
    """Peak live bytes of a real bf16-autocast step on this CPU (one process, the C++ attention
    kernel): the tensors known live before the step plus the growth of the resident set during it
    (glibc told to return every large block at once, so the resident set follows the tensors)."""
    import dataclasses
    import json
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", _MEASURE], input=json.dumps(
        {"cfg": dataclasses.asdict(cfg), "seq": seq, "mbs": mbs}), capture_output=True, text=True,
        env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def measured_section() -> None:
    from megatron_sc2.config import ModelConfig
    from megatron_sc2.planning import planner
    from megatron_sc2.parallel.layout import ParallelLayout
    from megatron_sc2.planning.memory_trace import trace_in_subprocess

    shapes = [ModelConfig(vocab_size=8192, hidden_size=512, ffn_hidden_size=2048, num_layers=4,
                          num_attention_heads=8, num_query_groups=2, max_position_embeddings=4096,
                          sliding_window=512, rope_theta=10000.0),
              ModelConfig(vocab_size=16384, hidden_size=1024, ffn_hidden_size=4096, num_layers=2,
                          num_attention_heads=8, num_query_groups=2, max_position_embeddings=4096,
                          sliding_window=1024, rope_theta=10000.0, tie_word_embeddings=False)]
    for cfg, (seq, mbs) in zip(shapes, [(2048, 2), (2048, 1)]):
        lay = planner.Layout(tp=1, pp=1, dp=1, cp=1, micro_batch_size=mbs, global_batch_size=mbs)
        est = planner.estimate_memory(cfg, lay, seq).total
        traced = trace_in_subprocess(cfg, ParallelLayout(micro_batch_size=mbs,
                                                         global_batch_size=mbs), seq).peak
        real = measured_cpu_peak(cfg, seq, mbs)
        print(f"CPU run h{cfg.hidden_size} L{cfg.num_layers} V{cfg.vocab_size} seq {seq} mbs {mbs}: "
              f"measured {real / GIB:.3f} GiB, traced {traced / GIB:.3f} GiB, estimate "
              f"{est / GIB:.3f} GiB (estimate / measured {est / real:.3f}, traced / measured "
              f"{traced / real:.3f})", flush=True)


if __name__ == "__main__" and "--measured" in sys.argv:
    measured_section()


def slope_section() -> None:
    """How the traces extrapolate to the full depth: the per-layer growth of the traced peak
    (four layers against two, no pipeline; at one layer a step's peak can sit elsewhere, in the
    embedding's backward) against the model's per-layer terms."""
    import dataclasses

    from megatron_sc2.config import preset
    from megatron_sc2.planning import planner
    from megatron_sc2.planning.memory_trace import trace_in_subprocess

    for model, tp, dp, seq in (("starcoder2-3b", 1, 1, 4096), ("starcoder2-7b", 2, 1, 16384),
                               ("starcoder2-15b", 4, 8, 4096)):
        lay = planner.Layout(tp=tp, pp=1, dp=dp, cp=1, micro_batch_size=1, global_batch_size=dp)
        t, e = [], []
        for layers in (2, 4):
            cfg = dataclasses.replace(preset(model), num_layers=layers)
            t.append(trace_in_subprocess(cfg, lay.parallel_layout(), seq).peak)
            e.append(planner.estimate_memory(cfg, lay, seq).total)
        full = preset(model).num_layers
        slope, est_slope = (t[1] - t[0]) / 2, (e[1] - e[0]) / 2
        print(f"{model:15} {lay.describe():22} seq {seq}: per layer traced {slope / GIB:.3f} "
              f"GiB, estimated {est_slope / GIB:.3f} GiB; {full} layers extrapolated from the "
              f"trace {(t[0] + (full - 2) * slope) / GIB:.2f} GiB, estimated "
              f"{planner.estimate_memory(preset(model), lay, seq).total / GIB:.2f} GiB", flush=True)


if __name__ == "__main__" and "--slope" in sys.argv:
    slope_section()


# Layouts given by hand: activation recomputation, and the interleaved schedule's first rank.
BY_HAND = [  # model, tp, pp, virtual, dp, seq, global batch, layers, recompute
    ("starcoder2-15b", 4, 1, 1, 1, 4096, 1, 2, "full"),
    ("starcoder2-15b", 4, 1, 1, 1, 16384, 1, 4, "full"),
    ("starcoder2-7b", 2, 2, 1, 1, 16384, 2, 2, "selective"),
    ("starcoder2-3b", 1, 1, 1, 4, 4096, 4, 2, "full"),
    ("starcoder2-7b", 1, 2, 2, 32, 4096, 128, 4, None),
    ("starcoder2-15b", 2, 2, 2, 16, 4096, 64, 4, None),
    ("starcoder2-7b", 2, 4, 2, 8, 4096, 64, 8, None),
    ("starcoder2-3b", 1, 4, 2, 8, 16384, 32, 8, None),
    ("starcoder2-3b", 1, 4, 2, 4, 16384, 32, 8, None),
]


def by_hand_section() -> None:
    import dataclasses

    from megatron_sc2.config import preset
    from megatron_sc2.planning import planner
    from megatron_sc2.planning.memory_trace import trace_in_subprocess

    for model, tp, pp, v, dp, seq, gbs, layers, rc in BY_HAND:
        cfg = dataclasses.replace(preset(model), num_layers=layers)
        lay = planner.Layout(tp=tp, pp=pp, dp=dp, cp=1, micro_batch_size=1, global_batch_size=gbs,
                             virtual_stages=v, recompute=rc)
        if v > 1:  # the first rank only (the tracer drives the interleaved first rank)
            traced = trace_in_subprocess(cfg, lay.parallel_layout(), seq, "first").peak
            est = planner._stage_memory(cfg, lay, seq, 0, planner.stage_shapes(cfg, tp, pp, v)[0]).total
        else:
            stages = ("first", "last") if pp > 1 else ("first",)
            traced = max(trace_in_subprocess(cfg, lay.parallel_layout(), seq, s).peak for s in stages)
            est = planner.estimate_memory(cfg, lay, seq).total
        print(f"{model:15} {lay.describe():26} {rc or '-':9} seq {seq} layers {layers}: traced "
              f"{traced / GIB:.2f} GiB, estimate {est / GIB:.2f} GiB, ratio {est / traced:.3f}",
              flush=True)


if __name__ == "__main__" and "--by-hand" in sys.argv:
    by_hand_section()
