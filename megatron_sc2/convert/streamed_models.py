"""Our StarCoder2 and transformers' Starcoder2ForCausalLM with weights loaded one decoder layer
at a time, so that `--verify-logits` fits in memory for a 3B or 15B model.

Both models are built on the meta device. What every forward needs (embedding, final norm,
lm_head, transformers' rotary buffers) is materialized on the CPU up front; each decoder layer
gets a forward pre-hook that loads its weights (fp32, rounded through the stored dtype) and a
forward hook that puts the meta parameters back, dropping the loaded ones. Each model then runs
its own, unchanged forward: transformers' code stays the independent oracle. Peak memory is the
embedding / head of both models plus about one decoder layer.

Our weights come from the DCP checkpoint (only the tensors asked for are read); transformers'
from the safetensors shards through the `safetensors` library and the index file, as
`from_pretrained` reads them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from megatron_sc2.config import ModelConfig
from megatron_sc2.convert.dcp_io import iter_model_tensors, read_model_specs
from megatron_sc2.convert.hf_dir import INDEX_FILE, SINGLE_FILE, read_weight_map
from megatron_sc2.convert.layout import TIED_HEAD, check_names_and_shapes
from megatron_sc2.errors import CheckpointError

# parameter names (dotted, from the model's root) -> {name: fp32 CPU tensor}
LayerLoader = Callable[[list[str]], dict[str, torch.Tensor]]


def _as_fp32(t: torch.Tensor, round_to: Optional[torch.dtype]) -> torch.Tensor:
    """fp32 copy of a stored tensor, rounded through `round_to` first (what the exported or
    imported weights are once they are stored in that dtype)."""
    if round_to is not None:
        t = t.to(round_to)
    return t.to(torch.float32)


def _set_param(model: nn.Module, name: str, value: nn.Parameter) -> nn.Parameter:
    """Swap the parameter `name` (dotted, from the model's root) for `value`; return the old one."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[leaf]
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(f"internal: {name} loaded with shape {tuple(value.shape)}, "
                              f"the model needs {tuple(old.shape)}")
    owner._parameters[leaf] = value
    return old


def _materialize(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        _set_param(model, name, nn.Parameter(t, requires_grad=False))


def _stream_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], load: LayerLoader) -> None:
    """Hooks on each (prefix, layer): load its parameters before its forward, restore the meta
    parameters (releasing the loaded ones) after it."""
    for prefix, layer in layers:
        names = [prefix + n for n, _ in layer.named_parameters()]
        meta = {prefix + n: p for n, p in layer.named_parameters()}

        def load_weights(_module, _args, names=names):
            _materialize(model, load(names))

        def drop_weights(_module, _args, _out, meta=meta):
            for name, p in meta.items():
                _set_param(model, name, p)

        layer.register_forward_pre_hook(load_weights)
        layer.register_forward_hook(drop_weights)


def _check_materialized(model: nn.Module, streamed_prefix: str, what: str) -> None:
    """Everything outside the streamed layers must be on the CPU by now."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta" and not name.startswith(streamed_prefix):
            raise CheckpointError(f"internal: {what} tensor {name} was left on the meta device")


def stream_our_model(ckpt: Path, cfg: ModelConfig, round_to: Optional[torch.dtype] = None) -> nn.Module:
    """Our StarCoder2 (eval mode) whose decoder layers load their weights from the DCP
    checkpoint `ckpt` while they run."""
    from megatron_sc2.model import StarCoder2

    specs = read_model_specs(ckpt)
    check_names_and_shapes({n: s.shape for n, s in specs.items()}, cfg, str(ckpt))

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        wanted = [specs[n] for n in names]
        # DCP casts into the buffer dtype while loading: rounding through `round_to` for free.
        return {n: _as_fp32(t, round_to)
                for n, t in iter_model_tensors(ckpt, wanted, dtype=round_to or torch.float32)}

    with torch.device("meta"):
        model = StarCoder2(cfg).eval()
    outer = [n for n, _ in model.named_parameters() if not n.startswith("layers.")]  # tied head once
    _materialize(model, load(outer))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _check_materialized(model, "layers.", "our model's")
    _stream_layers(model, [(f"layers.{i}.", layer) for i, layer in model.layers.items()], load)
    return model


class _SafetensorsWeights:
    """Where each weight of a HF directory lives (index file or single model.safetensors), and
    reading a few of them at a time through the safetensors library."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        weight_map = read_weight_map(hf_dir)
        if weight_map is None and not (hf_dir / SINGLE_FILE).is_file():
            raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            path = hf_dir / fname
            if not path.is_file():
                raise CheckpointError(f"{hf_dir}: missing shard {fname} listed in {INDEX_FILE}")
            with self._open(path, safe_open) as f:
                held = set(f.keys())
                names = held if weight_map is None else [k for k, v in weight_map.items() if v == fname]
                for name in names:
                    if name not in held:
                        raise CheckpointError(f"{path}: does not hold {name}, which {INDEX_FILE} places there")
                    self.file_of[name] = path
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    @staticmethod
    def _open(path: Path, safe_open):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError: a truncated or foreign file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def read(self, names: list[str], round_to: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.file_of[n]].append(n)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with self._open(path, safe_open) as f:  # closing unmaps the pages touched
                for n in group:
                    out[n] = _as_fp32(f.get_tensor(n), round_to)
        return out


def _first(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_hf_weights(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                      optional: dict[str, tuple[int, ...]], where: Path) -> None:
    """What from_pretrained refused before: missing, unexpected and mis-shaped weights.
    `optional`: weights that may be stored or not (the head of a tied model)."""
    missing = [n for n in expected if n not in stored]
    if missing:
        raise CheckpointError(f"{where}: missing weights {_first(missing)} (transformers' "
                              f"Starcoder2ForCausalLM needs them)")
    unexpected = [n for n in stored if n not in expected and n not in optional]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weights {_first(unexpected)} (not part of "
                              f"transformers' Starcoder2ForCausalLM with this config.json)")
    wanted = {**optional, **expected}
    mismatched = [f"{n} {list(s)} (needs {list(wanted[n])})" for n, s in stored.items() if s != wanted[n]]
    if mismatched:
        raise CheckpointError(f"{where}: mis-shaped weights {_first(mismatched)}")


def stream_hf_model(hf_dir: Path, round_to: Optional[torch.dtype] = None) -> nn.Module:
    """transformers' model for the directory's config.json (eval mode, fp32), its decoder layers
    loading their weights from the safetensors shards while they run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    config = AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != "Starcoder2ForCausalLM":
        raise CheckpointError(f"{hf_dir}: transformers builds {type(model).__name__}, not Starcoder2ForCausalLM")
    model.eval()
    tied = bool(model.config.tie_word_embeddings)

    weights = _SafetensorsWeights(hf_dir)
    # Buffers some old exports carry; from_pretrained ignores them too (recomputed from the config).
    stored = {n: s for n, s in weights.shapes.items() if not n.endswith("rotary_emb.inv_freq")}
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    optional = {"lm_head.weight": expected.pop("lm_head.weight")} if tied else {}
    _check_hf_weights(stored, expected, optional, hf_dir)

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        return weights.read(names, round_to)

    layer_prefix = "model.layers."
    outer = [n for n in expected if not n.startswith(layer_prefix)]
    _materialize(model, load(outer))
    if tied and "lm_head.weight" in stored:
        # A tied config with a stored head: transformers 5 keeps the stored head when it differs
        # from the embedding (and ties them when equal, which computes the same).
        _materialize(model, load(["lm_head.weight"]))
    elif tied:
        model.tie_weights()
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            raise CheckpointError("internal: transformers did not tie lm_head to the embedding")
    # Non-persistent buffers (RoPE inverse frequencies): transformers' own module, rebuilt on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    _check_materialized(model, layer_prefix, "transformers'")
    _stream_layers(model, [(f"{layer_prefix}{i}.", layer) for i, layer in enumerate(model.model.layers)], load)
    return model


__all__ = ["stream_our_model", "stream_hf_model"]
