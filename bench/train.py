"""Benchmark: one training step (forward, cross-entropy, backward, clip, AdamW) of our StarCoder2
against transformers' Starcoder2ForCausalLM on the same weights, batch and thread count, side by
side in one process (the methods take turns, step by step, so a busy machine slows all alike).

    python bench/train.py                        # CPU fp32, 2 threads: seq 256 / 2048 / 4096
    python bench/train.py --compile              # also ours with --compile (each block compiled)
    python bench/train.py --trainer              # the whole `megatron-sc2 train` step vs the bare step
    python bench/train.py --device cuda --bf16 --shape starcoder2-3b --layers 4 --seqs 4096 \\
        --batches 1 --windows 4096 --no-hf --compile # GPU: ours eager vs compiled, with MFU

Default shape: hidden 256 x 4 layers, 8 query / 2 kv heads, ffn 1024, vocab 8192 (the
`starcoder2-demo` preset); seq 256 batch 8 window 128, seq 2048 batch 1 window 512, seq 4096
batch 1 window 1024. Each line prints the median step time of each method and
transformers / ours (>1: we are faster); `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_sc2.config import ModelConfig, preset  # noqa: E402
from megatron_sc2.model import StarCoder2  # noqa: E402
from megatron_sc2.training import flops as flops_mod  # noqa: E402


def model_config(args, seq: int, window: int) -> ModelConfig:
    cfg = preset(args.shape)
    if args.layers:
        cfg.num_layers = args.layers
    cfg.sliding_window = window if 0 < window < seq else None
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq)
    return cfg.validate()


def hf_model(cfg: ModelConfig, ours: StarCoder2):
    """transformers' Starcoder2ForCausalLM with our weights (the names are HF's, under model.)."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from megatron_sc2.convert.hf_config import to_hf_config_dict

    d = to_hf_config_dict(cfg)
    d.pop("architectures"), d.pop("model_type"), d.pop("torch_dtype")
    hf = Starcoder2ForCausalLM(Starcoder2Config(**d))
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
          for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers: {missing} {unexpected}")
    return hf


def make_step(model: torch.nn.Module, logits_of: Callable, tokens, labels, device: str,
              bf16: bool) -> Callable[[], float]:
    """The bare step a user writes around a model: AdamW (foreach), clip 1.0, mean token loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    params = [p for p in model.parameters()]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = logits_of(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.detach()
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(methods: dict[str, Callable], repeats: int, warmup: int,
                device: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm each method up, then time them in turns, `repeats` rounds: (wall seconds, process
    CPU seconds) per method and round. On a shared machine the CPU time is the steadier one."""
    times: dict[str, list[float]] = {n: [] for n in methods}
    cpu: dict[str, list[float]] = {n: [] for n in methods}
    for name, fn in methods.items():
        t = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync(device)
        print(f"#   warm-up {name}: {time.perf_counter() - t:.1f}s", flush=True)
    for _ in range(repeats):
        for name, fn in methods.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return times, cpu


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den: methods timed in the same round saw the same load."""
    return statistics.median(a / b for a, b in zip(num, den))


def compare_models(args, device: str) -> list[dict]:
    rows = []
    for seq, batch, window in zip(args.seqs, args.batches, args.windows):
        cfg = model_config(args, seq, window)
        torch.manual_seed(0)
        ours = StarCoder2(cfg).to(device)
        gen = torch.Generator().manual_seed(1)
        data = torch.randint(1, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
        tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        methods: dict[str, Callable] = {}
        if not args.no_hf:
            hf = hf_model(cfg, ours).to(device)
            methods["transformers"] = make_step(hf, lambda t, m=hf: m(input_ids=t).logits,
                                                tokens, labels, device, args.bf16)
        if not args.compile_only:
            methods["ours"] = make_step(ours, ours, tokens, labels, device, args.bf16)
        if args.compile:
            from megatron_sc2.parallel.wrappers import compile_blocks

            torch.manual_seed(0)
            ours_c = StarCoder2(cfg).to(device)
            compile_blocks(ours_c.layers.values())
            methods["ours_compiled"] = make_step(ours_c, ours_c, tokens, labels, device, args.bf16)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, cpu = interleaved(methods, args.repeats, args.warmup, device)
        med = {n: statistics.median(t) for n, t in times.items()}
        row = {"seq": seq, "batch": batch, "window": window, "layers": cfg.num_layers,
               "hidden": cfg.hidden_size, "device": device, "bf16": args.bf16,
               "threads": torch.get_num_threads(), "median_s": med,
               "min_s": {n: min(t) for n, t in times.items()},
               "median_cpu_s": {n: statistics.median(t) for n, t in cpu.items()},
               "wall_s": times, "cpu_s": cpu}
        if "transformers" in med:
            row["speedup_vs_transformers"] = {n: paired_ratio(times["transformers"], t)
                                              for n, t in times.items() if n != "transformers"}
            row["cpu_speedup_vs_transformers"] = {n: paired_ratio(cpu["transformers"], t)
                                                  for n, t in cpu.items() if n != "transformers"}
        flops = flops_mod.train_flops_per_step(cfg, seq, batch)
        peak, source = flops_mod.device_peak_flops(torch.device(device))
        row["tflops"] = {n: flops / t / 1e12 for n, t in med.items()}
        if peak:
            row["mfu"] = {n: flops / t / peak for n, t in med.items()}
            row["peak_flops_source"] = source
        if device == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        text = " ".join(f"{n}={t * 1e3:.0f}ms" for n, t in med.items())
        ratio = " ".join(f"transformers/{n}={r:.2f}x (cpu time {row['cpu_speedup_vs_transformers'][n]:.2f}x)"
                         for n, r in row.get("speedup_vs_transformers", {}).items())
        mfu = " ".join(f"{n}={m:.1%}" for n, m in row.get("mfu", {}).items())
        print(f"seq={seq:5d} batch={batch} window={window:5d}  {text}  | {ratio}"
              + (f"  | MFU {mfu}" if mfu else ""), flush=True)
        rows.append(row)
        del methods
    return rows


def trainer_overhead(args, device: str) -> list[dict]:
    """`megatron-sc2 train`'s step (indexed dataset, sample gathering, batch building, the
    trainer's loss, clip and AdamW) against the bare model step on the same model, in turns."""
    from megatron_sc2.config import parse_train_args
    from megatron_sc2.data.indexed import write_documents
    from megatron_sc2.data.prep.train_tokenizer import train_tokenizer
    from megatron_sc2.training.trainer import Trainer

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        os.environ.pop(k, None)
    rows = []
    seq, batch, window = args.seqs[0], args.batches[0], args.windows[0]
    cfg = model_config(args, seq, window)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 50], 512, root / "tok")
        gen = torch.Generator().manual_seed(2)
        steps = args.warmup + args.repeats + 2
        n_docs = max(64, steps * batch * 2)
        # Token ids within the small tokenizer's vocabulary (the dataset is checked against
        # it); the model keeps the benchmark's vocabulary, so the compute is the same.
        docs = [torch.randint(1, 300, (int(l),), generator=gen).tolist()
                for l in torch.randint(seq // 2, seq * 2, (n_docs,), generator=gen)]
        write_documents(root / "data_text_document", docs)
        argv = ["--model", args.shape, "--num-layers", str(cfg.num_layers),
                "--vocab-size", str(cfg.vocab_size), "--seq-length", str(seq),
                "--sliding-window", str(cfg.sliding_window or 0),
                "--max-position-embeddings", str(cfg.max_position_embeddings),
                "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
                "--train-iters", "1000000", "--data-path", str(root / "data_text_document"),
                "--tokenizer-model", str(tok), "--split", "100,0,0", "--lr", "1e-4",
                "--data-cache-path", str(root / "cache"), "--device", device]
        if args.bf16:
            argv.append("--bf16")
        trainer = Trainer(parse_train_args(argv))
        data = torch.randint(1, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
        bare = make_step(trainer.model, trainer.model, data[:, :-1].contiguous(),
                         data[:, 1:].contiguous(), device, args.bf16)
        times, cpu = interleaved({"bare_step": bare, "trainer_step": trainer.train_step},
                                 args.repeats, args.warmup, device)
    med = {n: statistics.median(t) for n, t in times.items()}
    overhead = paired_ratio(times["trainer_step"], times["bare_step"]) - 1
    cpu_overhead = paired_ratio(cpu["trainer_step"], cpu["bare_step"]) - 1
    print(f"seq={seq} batch={batch} window={window}  bare={med['bare_step'] * 1e3:.0f}ms "
          f"trainer={med['trainer_step'] * 1e3:.0f}ms  | overhead {overhead:+.1%} "
          f"(cpu time {cpu_overhead:+.1%})", flush=True)
    rows.append({"seq": seq, "batch": batch, "window": window, "median_s": med,
                 "min_s": {n: min(t) for n, t in times.items()}, "trainer_overhead": overhead,
                 "trainer_cpu_overhead": cpu_overhead, "wall_s": times, "cpu_s": cpu,
                 "threads": torch.get_num_threads(), "device": device})
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", default="starcoder2-demo", help="model preset whose shape to use")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--seqs", type=_ints, default=[256, 2048, 4096])
    p.add_argument("--batches", type=_ints, default=[8, 1, 1])
    p.add_argument("--windows", type=_ints, default=[128, 512, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="autocast to bf16 (fp32 weights)")
    p.add_argument("--compile", action="store_true", help="also time ours with --compile")
    p.add_argument("--compile-only", action="store_true", help="with --compile: no eager ours")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. not installed)")
    p.add_argument("--trainer", action="store_true",
                   help="the megatron-sc2 train step vs the bare model step (first seq only)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not (len(args.seqs) == len(args.batches) == len(args.windows)):
        p.error("--seqs, --batches and --windows need the same number of entries")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/train.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from megatron_sc2.ops.attention import attention_backend

    probe = torch.empty(1, 1, 1, 32, device=args.device,
                        dtype=torch.bfloat16 if args.bf16 and args.device == "cuda" else torch.float32)
    gpu = f" gpu={torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"# device={args.device}{gpu} threads={torch.get_num_threads()} "
          f"attention={attention_backend(probe)} torch={torch.__version__} "
          f"load={os.getloadavg()[0]:.1f} shape={args.shape} bf16={args.bf16}", flush=True)
    rows = trainer_overhead(args, args.device) if args.trainer else compare_models(args, args.device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
