"""A pipeline stage is StarCoder2 with layers deleted, as the model's docstring says.

`keep_layers` returns a StarCoder2 that shares the full model's submodules but holds only some
layers (under their global names `layers.{i}`), the embedding only on the first stage and the
final norm and lm_head only on the last. Its forward is the model's own; its state dict keys are
the single-process ones, so checkpoints load under any layout. Rotary positions come from the
position ids the engine always passes, so a residual stream holding a sequence shard (sequence
parallelism) still rotates by the global positions.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from megatron_sc2.model.starcoder2 import StarCoder2


def keep_layers(model: StarCoder2, layer_ids: Iterable[int], first: bool, last: bool) -> StarCoder2:
    """`model` itself when the stage keeps everything (one stage), else a StarCoder2 sharing
    its submodules with only `layer_ids`; the embedding if `first`, norm and lm_head if `last`."""
    ids = [str(i) for i in layer_ids]
    if first and last and ids == list(model.layers.keys()):
        return model
    stage = StarCoder2.__new__(StarCoder2)  # no new parameters: the modules are the model's
    nn.Module.__init__(stage)
    stage.cfg = model.cfg
    stage.embed_tokens = model.embed_tokens if first else None
    stage.layers = nn.ModuleDict({i: model.layers[i] for i in ids})
    stage.norm = model.norm if last else None
    stage.lm_head = model.lm_head if last else None
    return stage


class RankModel(nn.Module):
    """Everything one rank holds when it runs several model chunks (interleaved schedule),
    under the model's names: one place for the optimizer's parameters and for state dicts."""

    def __init__(self, chunks: list[StarCoder2]):
        super().__init__()
        layers: dict[str, nn.Module] = {}
        for chunk in chunks:
            layers.update(chunk.layers.items())
        self.embed_tokens = next((c.embed_tokens for c in chunks if c.embed_tokens is not None), None)
        self.layers = nn.ModuleDict(dict(sorted(layers.items(), key=lambda kv: int(kv[0]))))
        self.norm = next((c.norm for c in chunks if c.norm is not None), None)
        self.lm_head = next((c.lm_head for c in chunks if c.lm_head is not None), None)
