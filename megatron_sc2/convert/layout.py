"""The tensors a StarCoder2 checkpoint must hold for a given config, in a stable order.

Built from the model itself on the meta device, so the converter and the model can never
disagree about names or shapes. A tied head is not stored (HF and our format both omit it).
"""

from __future__ import annotations

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.errors import CheckpointError
from megatron_sc2.training.checkpoint import TIED_HEAD  # the one tied-embedding rule


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape, in the model's order (embedding, layers, norm, head)."""
    from megatron_sc2.model import StarCoder2

    with torch.device("meta"):
        model = StarCoder2(cfg)
    out = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        out.pop(TIED_HEAD, None)
    return out


def check_names_and_shapes(found: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str,
                           display=lambda n: n) -> list[str]:
    """Compare the tensors found against the config; return the names to convert, in order.

    A stored head of a tied model is ignored (some exporters write it); anything else extra,
    missing or mis-shaped is refused with the tensor named. `display` maps our name to the name
    the user sees in `where` (the HF name for a HF directory).
    """
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: missing tensors {', '.join(display(n) for n in missing[:3])}{more}")
    extra = [n for n in found if n not in want and not (n == TIED_HEAD and cfg.tie_word_embeddings)]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(
            f"{where}: unexpected tensors {', '.join(display(n) for n in extra[:3])}{more} "
            f"(not part of a StarCoder2 model with this config)")
    for name, shape in want.items():
        if tuple(found[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {display(name)} has shape {list(found[name])}, but the config "
                f"needs {list(shape)}")
    return list(want)
