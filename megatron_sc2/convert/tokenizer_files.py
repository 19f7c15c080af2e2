"""Tokenizer files and generation_config.json for an exported Hugging Face directory.

The tokenizer package (`megatron_sc2.data.tokenizer`) knows every format we train with and
writes a HF tokenizer directory itself; when it is not importable (or cannot save), a HF
`tokenizer.json` or tokenizer directory is copied as is, with a `tokenizer_config.json` written
when the source has none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_sc2.config import ModelConfig
from megatron_sc2.convert.hf_dir import TOKENIZER_FILES
from megatron_sc2.errors import CheckpointError

EOD_TOKEN = "<|endoftext|>"
FILE_SEP_TOKEN = "<file_sep>"


def _save_with_package(src: Path, out_dir: Path) -> bool:
    try:
        from megatron_sc2.data.tokenizer import load_tokenizer  # type: ignore[attr-defined]
    except ImportError:
        return False
    tok = load_tokenizer(str(src))
    save = getattr(tok, "save_hf", None)
    if save is None:
        return False
    save(str(out_dir))
    return True


def _copy_hf_files(src: Path, out_dir: Path, model_max_length: int) -> None:
    if src.is_dir():
        if not (src / "tokenizer.json").is_file():
            raise CheckpointError(f"tokenizer directory {src} has no tokenizer.json")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)
    elif src.is_file() and src.suffix == ".json":
        shutil.copyfile(src, out_dir / "tokenizer.json")
    else:
        raise CheckpointError(
            f"cannot export tokenizer {src}: only a HF tokenizer.json or tokenizer directory can be "
            f"copied without megatron_sc2.data.tokenizer")
    if not (out_dir / "tokenizer_config.json").is_file():
        _write_tokenizer_config(out_dir, model_max_length)


def _write_tokenizer_config(out_dir: Path, model_max_length: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eod = EOD_TOKEN if tok.token_to_id(EOD_TOKEN) is not None else None
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": eod,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_tokenizer(src: str | Path, out_dir: Path, cfg: ModelConfig) -> None:
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"tokenizer not found: {src} (pass --tokenizer PATH)")
    if not _save_with_package(src, out_dir):
        _copy_hf_files(src, out_dir, cfg.max_position_embeddings)
    size = _vocab_size(out_dir)
    if size is not None and size > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer {src} has {size} tokens but the model's vocabulary has only {cfg.vocab_size} "
            f"(--tokenizer names the wrong tokenizer?)")


def _vocab_size(out_dir: Path) -> Optional[int]:
    path = out_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def token_id(out_dir: Path, token: str) -> Optional[int]:
    path = out_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).token_to_id(token)


def write_generation_config(out_dir: Path, cfg: ModelConfig) -> dict:
    """eos = <|endoftext|>, with <file_sep> as a second stop token (StarCoder2 separates files
    with it, so a completion should end there too)."""
    eos = token_id(out_dir, EOD_TOKEN)
    eos = cfg.eos_token_id if eos is None else eos
    stops = [eos]
    sep = token_id(out_dir, FILE_SEP_TOKEN)
    if sep is not None and sep != eos:
        stops.append(sep)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": stops, "pad_token_id": eos,
           "_from_model_config": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return gen
