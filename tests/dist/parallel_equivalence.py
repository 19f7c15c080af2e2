"""Worker for tests/test_parallel.py: launched once per world size (gloo, CPU), it trains a
tiny StarCoder2 (window smaller than the sequence) under each layout it is given and compares
per-step losses and first-step gradients with a single-process run computed in the same
process. After training, each layout's validation loss (the engine's `evaluate`: forward only,
with the position and document ids) must equal the single-process model's on the same batch.
Prints one JSON line per layout on rank 0; exits non-zero on any mismatch."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sc2.config import ModelConfig
from megatron_sc2.data.batch import get_batch
from megatron_sc2.model.starcoder2 import StarCoder2
from megatron_sc2.parallel.context_parallel import BYTES_SENT, halo_volume_bytes
from megatron_sc2.parallel.engine import ParallelModel, build_mesh
from megatron_sc2.parallel.layout import ParallelLayout
from torch.distributed.tensor import DTensor

STEPS = 5
SEQ = 24
GLOBAL_BATCH = 8
LR = 1e-3
CLIP = 1.0


def tiny_config(tied: bool, kv_heads: int = 2, layers: int = 4, window: int = 8) -> ModelConfig:
    # Window 8 < sequence 24; kv_heads=1 makes TP2 replicate the kv head; 3 layers on 2
    # stages is an uneven split. window 0: plain causal.
    return ModelConfig(vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=layers,
                       num_attention_heads=4, num_query_groups=kv_heads, max_position_embeddings=64,
                       sliding_window=window or None, rope_theta=10000.0, init_method_std=0.05,
                       tie_word_embeddings=tied).validate()


EOD = 0


def make_batches(cfg: ModelConfig, docs: bool = False) -> list[dict[str, Optional[torch.Tensor]]]:
    """Random samples; with docs, packed documents (end-of-document tokens at random places)
    with reset position ids and document ids, as --reset-position-ids --reset-attention-mask
    give them."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        t = torch.randint(1, cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
        if docs:
            t[torch.rand(t.shape, generator=g) < 0.15] = EOD
        batch = get_batch(t, EOD, reset_position_ids=docs, reset_attention_mask=docs)
        if not docs:
            batch["position_ids"] = None
        out.append(batch)
    return out


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                             foreach=False)


def reference_run(cfg: ModelConfig, batches):
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    opt = make_optimizer(model.parameters())
    losses, first_grads, norms = [], None, []
    for step, b in enumerate(batches):
        opt.zero_grad()
        logits = model(b["tokens"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), b["labels"].reshape(-1))
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(float(loss))
    with torch.no_grad():
        b = batches[0]
        logits = model(b["tokens"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        valid = float(F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), b["labels"].reshape(-1)))
    return losses, first_grads, norms, valid


def full_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.full_tensor() if isinstance(g, DTensor) else g


def parallel_run(cfg: ModelConfig, layout: ParallelLayout, batches, compile: bool = False):
    mesh = build_mesh(layout)
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    pm = ParallelModel.build(cfg, layout, mesh, model=model, compile=compile)
    opt = make_optimizer(pm.parameters())
    dp_rank = mesh["dp"].get_local_rank()
    losses, first_grads, norms = [], None, []
    n = layout.local_batch_size

    def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[dp_rank * n:(dp_rank + 1) * n]

    halo_bytes = None
    for step, b in enumerate(batches):
        opt.zero_grad()
        BYTES_SENT.reset()
        loss = pm.forward_backward(local(b["tokens"]), local(b["labels"]),
                                   position_ids=local(b["position_ids"]),
                                   document_ids=local(b["document_ids"]))
        if step == 1 and layout.cp > 1:  # step 0 also builds the pipeline schedule
            sent = torch.tensor([BYTES_SENT.kv_forward + BYTES_SENT.kv_backward], dtype=torch.int64)
            dist.all_reduce(sent)
            halo_bytes = int(sent)
        if step == 0:
            first_grads = {name: full_grad(p).detach().clone()
                           for name, p in pm.named_parameters() if p.grad is not None}
        norms.append(float(pm.clip_grad_norm_(CLIP)))
        opt.step()
        losses.append(float(loss))
    b = batches[0]
    valid, _ = pm.evaluate({k: local(b[k]) for k in ("tokens", "labels", "loss_mask",
                                                      "position_ids", "document_ids")})
    del pm, opt, model, mesh
    gc.collect()
    return losses, first_grads, norms, float(valid), halo_bytes


def expected_halo_bytes(cfg: ModelConfig, layout: ParallelLayout) -> int:
    """K/V bytes the whole world must send in one training step: every (dp, tp) coordinate's CP
    group moves the analytical halo volume of its local batch and kv heads over all layers."""
    kv_local = max(cfg.num_query_groups // layout.tp, 1)
    return layout.dp * layout.tp * halo_volume_bytes(
        SEQ, layout.cp, cfg.sliding_window, layout.local_batch_size, kv_local, cfg.head_dim,
        cfg.num_layers, elem_bytes=4)


def meta_init_check(cfg: ModelConfig, layout: ParallelLayout) -> dict:
    """Shard-by-shard initialization from the meta device: nothing left on meta, replicated
    parameters equal on every rank holding them, the last stage's tied copy equal to the
    embedding, and weights with the configured spread."""
    mesh = build_mesh(layout)
    with torch.device("meta"):
        model = StarCoder2(cfg)
    pm = ParallelModel.build(cfg, layout, mesh, model=model, init_seed=11)
    problems = []
    params = dict(pm.named_parameters())
    if any(p.device.type == "meta" for p in params.values()):
        problems.append("parameters left on meta")
    local = {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    replicated = [n for n, p in params.items()
                  if not isinstance(p, DTensor) or all(pl.is_replicate() for pl in p.placements)]
    tied_name = {"lm_head.weight": "embed_tokens.weight"} if cfg.tie_word_embeddings else {}
    checked = 0
    for name in replicated:
        for other in everyone:
            for key in (name, tied_name.get(name)):
                if key in other and other[key].shape == local[name].shape:
                    checked += 1
                    if not torch.equal(other[key], local[name]):
                        problems.append(f"{name} differs from {key} on another rank")
    for name, t in local.items():
        if name.endswith("q_proj.weight"):
            std = float(t.std())
            if not 0.8 * cfg.init_method_std < std < 1.2 * cfg.init_method_std:
                problems.append(f"{name} std {std}")
    del pm, model, mesh
    gc.collect()
    return {"ok": not problems and checked > 0, "problems": problems[:5], "grads_checked": checked,
            "losses": []}


def mixed_precision_check(cfg: ModelConfig, layout: ParallelLayout, batches) -> dict:
    """--bf16 under data parallelism: inside forward the all-gathered block parameters are
    bf16, the sharded parameters and their gradients stay fp32, gradients are reduced in fp32."""
    mesh = build_mesh(layout)
    torch.manual_seed(0)
    pm = ParallelModel.build(cfg, layout, mesh, model=StarCoder2(cfg), bf16=True)
    seen: list[torch.dtype] = []
    layer = next(iter(pm.rank_model.layers.values()))
    hook = layer.self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.weight.dtype))
    n, dp_rank = layout.local_batch_size, mesh["dp"].get_local_rank()
    b = batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm.forward_backward(b["tokens"][dp_rank * n:(dp_rank + 1) * n],
                                   b["labels"][dp_rank * n:(dp_rank + 1) * n])
    hook.remove()
    problems = []
    if not seen or any(d != torch.bfloat16 for d in seen):
        problems.append(f"all-gathered q_proj weight dtypes in forward: {seen}")
    params = dict(pm.named_parameters())
    for name, p in params.items():
        if p.dtype != torch.float32 or (p.grad is not None and p.grad.dtype != torch.float32):
            problems.append(f"{name}: param {p.dtype}, grad {None if p.grad is None else p.grad.dtype}")
    reduce = {fp.reduce_dtype for chunk in pm.chunks for mod in [chunk, *chunk.layers.values()]
              for fp in mod._get_fsdp_state()._fsdp_param_group.fsdp_params}
    if reduce != {torch.float32}:
        problems.append(f"gradient reduce dtypes {reduce}")
    grads = sum(p.grad is not None for p in params.values())
    if not torch.isfinite(loss) or grads == 0:
        problems.append(f"loss {float(loss)}, {grads} gradients")
    del pm, mesh, layer
    gc.collect()
    return {"ok": not problems, "problems": problems[:5], "grads_checked": grads, "losses": [],
            "gathered_dtypes": sorted({str(d) for d in seen})}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def parse_layout(spec: str) -> tuple[ParallelLayout, ModelConfig]:
    """'tp2.pp2.dp1.cp2.v2.sp.untied.full.kv1.layers3.w16.docs' -> layout, model config ('docs'
    is read by main: packed documents with reset positions and attention; wN: sliding window N,
    w0 none)."""
    vals = {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "v": 1, "mbs": 1, "kv": 2, "layers": 4, "w": 8}
    sp, tied, recompute = False, True, None
    for part in spec.split("."):
        if part == "sp":
            sp = True
        elif part == "untied":
            tied = False
        elif part in ("meta", "docs", "bf16", "compile"):
            continue
        elif part in ("full", "selective"):
            recompute = part
        else:
            key = part.rstrip("0123456789")
            vals[key] = int(part[len(key):])
    layout = ParallelLayout(tp=vals["tp"], pp=vals["pp"], dp=vals["dp"],
                            micro_batch_size=vals["mbs"], global_batch_size=GLOBAL_BATCH,
                            sequence_parallel=sp, virtual_stages=vals["v"],
                            recompute_granularity=recompute, cp=vals["cp"])
    return layout, tiny_config(tied, vals["kv"], vals["layers"], vals["w"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("layouts", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    refs = {}
    failed = False
    for spec in args.layouts:
        layout, cfg = parse_layout(spec)
        layout.validate(cfg, SEQ)
        if spec.startswith("meta.") or "bf16" in spec.split("."):
            try:
                if spec.startswith("meta."):
                    result = dict(meta_init_check(cfg, layout), layout=spec)
                else:
                    result = dict(mixed_precision_check(cfg, layout, make_batches(cfg)), layout=spec)
            except Exception as e:
                result = {"layout": spec, "ok": False, "error": f"{type(e).__name__}: {e}",
                          "trace": traceback.format_exc()[-3000:]}
            results = [None] * dist.get_world_size()
            dist.all_gather_object(results, result)
            if rank == 0:
                bad = [r for r in results if not r["ok"]]
                print(json.dumps(dict(bad[0] if bad else results[0], ok=not bad)), flush=True)
            failed |= any(not r["ok"] for r in results)
            continue
        docs = "docs" in spec.split(".")
        batches = make_batches(cfg, docs)
        key = json.dumps(dict(cfg.to_dict(), docs=docs), sort_keys=True)
        if key not in refs:
            refs[key] = reference_run(cfg, batches)
        ref_losses, ref_grads, ref_norms, ref_valid = refs[key]
        compiling = "compile" in spec.split(".")
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        try:
            losses, grads, norms, valid, halo_bytes = parallel_run(
                cfg, layout, batches, compile=compiling)
            loss_err = max(rel(a, b) for a, b in zip(losses, ref_losses))
            norm_err = max(rel(a, b) for a, b in zip(norms, ref_norms))
            grad_err = 0.0
            for name, g in grads.items():
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    name = "embed_tokens.weight"  # the last stage's copy of the tied weight
                r = ref_grads[name]
                grad_err = max(grad_err, float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)))
            valid_err = rel(valid, ref_valid)
            ok = (loss_err <= 1e-5 and grad_err <= 1e-5 and norm_err <= 1e-5 and valid_err <= 1e-5
                  and len(grads) > 0)
            extra = {}
            if compiling:  # the blocks really ran compiled graphs (not all eager fallbacks)
                extra["compiled_graphs"] = (torch._dynamo.utils.counters["stats"]["unique_graphs"]
                                            - graphs_before)
                ok = ok and extra["compiled_graphs"] > 0
            if layout.cp > 1 and layout.recompute_granularity is None:
                # The exchange moved exactly the halo (K/V forward, dK/dV back), nothing more.
                extra.update(halo_bytes=halo_bytes, expected_halo_bytes=expected_halo_bytes(cfg, layout))
                ok = ok and halo_bytes == extra["expected_halo_bytes"] and halo_bytes > 0
            result = {"layout": spec, "ok": ok, **extra, "loss_rel_err": loss_err,
                      "grad_rel_err": grad_err, "norm_rel_err": norm_err, "valid_rel_err": valid_err,
                      "grads_checked": len(grads), "losses": losses,
                      "ref_losses": ref_losses}
        except Exception as e:  # report and go on to the next layout
            result = {"layout": spec, "ok": False, "error": f"{type(e).__name__}: {e}",
                      "trace": traceback.format_exc()[-3000:]}
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        if rank == 0:
            worst = dict(results[0])
            worst["ok"] = all(r["ok"] for r in results)
            for r in results:
                if not r["ok"]:
                    worst = dict(r, ok=False)
                    break
            worst["grads_checked"] = sum(r.get("grads_checked", 0) for r in results)
            print(json.dumps(worst), flush=True)
        failed |= not all(r["ok"] for r in results)
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
