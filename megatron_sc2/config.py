"""Model presets and training settings, validated before anything starts.

`ModelConfig` carries StarCoder2's architecture (the released Hugging Face values for the
3B/7B/15B presets). `TrainConfig` carries every training flag, named as Megatron names them;
`parse_train_args` reads a YAML `--config FILE` and lets command-line flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_sc2.errors import CommandLineParser, ConfigError


@dataclass
class ModelConfig:
    """StarCoder2's architecture. `sliding_window` has the HF meaning (None = plain causal):
    the query at position i sees keys j with i - w < j <= i."""

    vocab_size: int = 49152
    hidden_size: int = 3072
    ffn_hidden_size: int = 12288
    num_layers: int = 30
    num_attention_heads: int = 24
    num_query_groups: int = 2
    max_position_embeddings: int = 16384
    sliding_window: Optional[int] = 4096
    rope_theta: float = 999999.4420358813
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.018042
    tie_word_embeddings: bool = True
    use_bias: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "ModelConfig":
        positive = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                    "num_attention_heads", "num_query_groups", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden size {self.hidden_size} is not divisible by the number of attention heads "
                f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"attention heads ({self.num_attention_heads}) are not divisible by kv heads "
                f"(--num-query-groups {self.num_query_groups})")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None:
            if self.sliding_window <= 0:
                raise ConfigError(f"--sliding-window must be positive (or 0 for none), got {self.sliding_window}")
            if self.sliding_window > self.max_position_embeddings:
                raise ConfigError(
                    f"--sliding-window {self.sliding_window} is larger than the context "
                    f"(--max-position-embeddings {self.max_position_embeddings})")
        return self

    def num_params(self) -> int:
        """Parameter count (tied head counted once)."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        b = 1 if self.use_bias else 0
        attn = h * h + b * h + 2 * (h * kv + b * kv) + h * h + b * h
        mlp = h * f + b * f + f * h + b * h
        norms = 2 * 2 * h
        per_layer = attn + mlp + norms
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + L * per_layer + 2 * h + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    "starcoder2-3b": ModelConfig(
        hidden_size=3072, ffn_hidden_size=12288, num_layers=30, num_attention_heads=24,
        num_query_groups=2, rope_theta=999999.4420358813, tie_word_embeddings=True,
        init_method_std=0.018042),
    "starcoder2-7b": ModelConfig(
        hidden_size=4608, ffn_hidden_size=18432, num_layers=32, num_attention_heads=36,
        num_query_groups=4, rope_theta=1000000.0, tie_word_embeddings=True,
        init_method_std=0.018042),
    "starcoder2-15b": ModelConfig(
        hidden_size=6144, ffn_hidden_size=24576, num_layers=40, num_attention_heads=48,
        num_query_groups=4, rope_theta=100000.0, tie_word_embeddings=False,
        init_method_std=0.01275),
    # Small presets for tests and the CPU demo: same architecture, tiny sizes.
    "starcoder2-tiny": ModelConfig(
        vocab_size=512, hidden_size=64, ffn_hidden_size=256, num_layers=2, num_attention_heads=4,
        num_query_groups=2, max_position_embeddings=256, sliding_window=16, rope_theta=10000.0,
        init_method_std=0.02),
    "starcoder2-demo": ModelConfig(
        vocab_size=8192, hidden_size=256, ffn_hidden_size=1024, num_layers=4,
        num_attention_heads=8, num_query_groups=2, max_position_embeddings=1024,
        sliding_window=128, rope_theta=10000.0, init_method_std=0.02),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])


@dataclass
class TrainConfig:
    """Every training flag (Megatron's names with underscores). None = not set."""

    # model
    model: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None
    sliding_window: Optional[int] = None
    rotary_base: Optional[float] = None
    untie_embeddings_and_output_weights: bool = False
    init_method_std: Optional[float] = None
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    # data
    data_path: list[str] = field(default_factory=list)
    train_data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    test_data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer_model: Optional[str] = None
    seed: int = 1234
    data_cache_path: Optional[str] = None
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 1          # threads building the next step's batch while this one runs (0: none)
    mock_data: bool = False
    # batch
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    train_iters: int = 100
    eval_interval: int = 0
    eval_iters: int = 0
    # code evaluation during training (megatron_sc2/eval/during_training.py)
    eval_code_interval: int = 0       # every N steps: greedy pass@1 on --eval-code-tasks
    eval_code_tasks: str = "humaneval"
    eval_code_limit: int = 20         # first K tasks of each set (0: all)
    eval_code_max_new_tokens: int = 256
    eval_code_workers: int = 2        # sandboxed programs at a time
    # optimizer
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    bf16: bool = False
    # parallel
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1  # sequence split in C chunks; attention exchanges the halo
    sequence_parallel: bool = False
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    recompute_granularity: Optional[str] = None
    compile: bool = False         # torch.compile each transformer block (as torchtitan does)
    distributed_timeout_minutes: float = 10.0
    # checkpoints and logs
    save: Optional[str] = None
    load: Optional[str] = None
    ckpt_step: Optional[int] = None  # with --load: this iteration instead of the latest
    save_interval: int = 0
    log_interval: int = 1
    log_dir: Optional[str] = None
    tensorboard_dir: Optional[str] = None  # TensorBoard event files (rank 0), Megatron's flag
    wandb_project: Optional[str] = None    # Weights & Biases (optional package; WANDB_MODE honoured)
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    keep_last: int = 0
    async_save: bool = False      # write checkpoints in a background thread; training goes on
    finetune: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_interval: int = 0
    exit_signal: str = "SIGUSR1"  # slurm's --signal: save, exit and requeue (SIGTERM: save, exit)
    requeue: bool = True          # `scontrol requeue` after an exit-signal/duration stop under slurm
    nan_policy: str = "stop"
    device: Optional[str] = None

    def model_config(self, tokenizer_vocab_size: Optional[int] = None) -> ModelConfig:
        """The model this run trains: a preset, then explicit flags on top."""
        cfg = preset(self.model) if self.model else ModelConfig()
        overrides = {
            "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size, "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rotary_base, "init_method_std": self.init_method_std,
        }
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        if self.sliding_window is not None:
            cfg.sliding_window = self.sliding_window or None
        if self.untie_embeddings_and_output_weights:
            cfg.tie_word_embeddings = False
        if self.vocab_size is not None:
            if tokenizer_vocab_size is not None and self.vocab_size < tokenizer_vocab_size:
                raise ConfigError(f"--vocab-size {self.vocab_size} is below the tokenizer's {tokenizer_vocab_size} "
                                  "tokens (ids at or above it would index past the embedding)")
            cfg.vocab_size = self.vocab_size
        elif tokenizer_vocab_size is not None:
            m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
            cfg.vocab_size = int(math.ceil(tokenizer_vocab_size / m) * m)
        if self.seq_length > cfg.max_position_embeddings:
            raise ConfigError(
                f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                f"{cfg.max_position_embeddings}")
        return cfg.validate()

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{_flag(f.name)} must be a finite number, got {v}")
        for name, lo, hi, what in _DOMAINS:
            v = getattr(self, name)
            if v is None:
                continue
            low_ok = lo is None or (v > lo if name in _OPEN_LOW else v >= lo)
            if not low_ok or (hi is not None and not v < hi):
                raise ConfigError(f"{_flag(name)} must be {what}, got {v}")
        if self.seq_length <= 0:
            raise ConfigError(f"--seq-length must be positive, got {self.seq_length}")
        if self.micro_batch_size <= 0:
            raise ConfigError(f"--micro-batch-size must be positive, got {self.micro_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ConfigError(f"--global-batch-size must be positive, got {self.global_batch_size}")
        if self.train_iters <= 0:
            raise ConfigError(f"--train-iters must be positive, got {self.train_iters}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}")
        if not 0.0 <= self.fim_rate <= 1.0 or not 0.0 <= self.fim_spm_rate <= 1.0:
            raise ConfigError("--fim-rate and --fim-spm-rate must lie in [0, 1]")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ConfigError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        if self.nan_policy not in ("skip", "stop"):
            raise ConfigError(f"--nan-policy must be skip or stop, got {self.nan_policy!r}")
        parse_signal(self.exit_signal)
        if self.context_parallel_size <= 0:
            raise ConfigError(f"--context-parallel-size must be positive, got "
                              f"{self.context_parallel_size}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        self._validate_code_eval()
        return self

    def _validate_code_eval(self) -> None:
        if self.eval_code_interval < 0:
            raise ConfigError(f"--eval-code-interval must be >= 0, got {self.eval_code_interval}")
        if self.eval_code_interval == 0:
            return
        if not self.tokenizer_model:
            raise ConfigError("--eval-code-interval needs --tokenizer-model (prompts must be encoded)")
        if self.eval_code_limit < 0:
            raise ConfigError(f"--eval-code-limit must be >= 0 (0: all tasks), got {self.eval_code_limit}")
        if self.eval_code_max_new_tokens < 1 or self.eval_code_workers < 1:
            raise ConfigError("--eval-code-max-new-tokens and --eval-code-workers must be >= 1")
        try:
            parse_task_list(self.eval_code_tasks)
        except ConfigError as e:
            raise ConfigError(str(e).replace("--tasks", "--eval-code-tasks")) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (field, lower bound, upper bound (exclusive), what the message says); fields in _OPEN_LOW
# exclude their lower bound.
_DOMAINS: tuple[tuple[str, Any, Any, str], ...] = (
    ("lr", 0.0, None, "non-negative"), ("min_lr", 0.0, None, "non-negative"),
    ("weight_decay", 0.0, None, "non-negative"), ("clip_grad", 0.0, None, "non-negative (0: no clipping)"),
    ("adam_beta1", 0.0, 1.0, "in [0, 1)"), ("adam_beta2", 0.0, 1.0, "in [0, 1)"),
    ("adam_eps", 0.0, None, "positive"), ("init_method_std", 0.0, None, "positive"),
    ("rotary_base", 0.0, None, "positive"), ("distributed_timeout_minutes", 0.0, None, "positive"),
    ("exit_duration_in_mins", 0.0, None, "non-negative"),
    ("lr_warmup_iters", 0, None, "non-negative"), ("lr_decay_iters", 1, None, "positive"),
    ("save_interval", 0, None, "non-negative"), ("log_interval", 1, None, "positive"),
    ("eval_interval", 0, None, "non-negative"), ("eval_iters", 0, None, "non-negative"),
    ("keep_last", 0, None, "non-negative"), ("exit_interval", 0, None, "non-negative"),
    ("num_workers", 0, None, "non-negative"), ("ckpt_step", 0, None, "non-negative"),
    ("tensor_model_parallel_size", 1, None, "positive"), ("pipeline_model_parallel_size", 1, None, "positive"),
    ("make_vocab_size_divisible_by", 1, None, "positive"), ("vocab_size", 1, None, "positive"),
    ("num_layers", 1, None, "positive"), ("hidden_size", 1, None, "positive"),
    ("ffn_hidden_size", 1, None, "positive"), ("num_attention_heads", 1, None, "positive"),
    ("num_query_groups", 1, None, "positive"), ("max_position_embeddings", 1, None, "positive"),
    ("sliding_window", 0, None, "non-negative (0: none)"),
    ("num_layers_per_virtual_pipeline_stage", 1, None, "positive"),
)
_OPEN_LOW = {"adam_eps", "init_method_std", "rotary_base", "distributed_timeout_minutes"}


def parse_signal(name: str, setting: str = "--exit-signal") -> signal.Signals:
    """'USR1', 'SIGUSR1' or '10' -> signal.SIGUSR1; anything else is a ConfigError naming the flag."""
    text = str(name).strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            pass
    else:
        sig = getattr(signal.Signals, text if text.startswith("SIG") else "SIG" + text, None)
        if isinstance(sig, signal.Signals):
            return sig
    raise ConfigError(f"{setting} {name!r} is not a signal name (e.g. SIGUSR1, USR2, TERM)")


# Code-evaluation task sets (megatron-sc2 eval --tasks, --eval-code-tasks); built in eval/tasks.py.
HUMANEVAL = "humaneval"
INFILL_SINGLE = "humaneval-infill-single"
INFILL_MULTI = "humaneval-infill-multi"
INFILL_SPAN = "humaneval-infill-span"
TASK_SETS = (HUMANEVAL, INFILL_SINGLE, INFILL_MULTI, INFILL_SPAN)


def parse_task_list(text: str) -> list[str]:
    """'humaneval,humaneval-infill-single' -> the names, each known, duplicates dropped."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks: name at least one task")
    for n in names:
        if n not in TASK_SETS:
            raise ConfigError(f"--tasks: unknown task {n!r} (known: {', '.join(TASK_SETS)})")
    return list(dict.fromkeys(names))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="megatron-sc2 train", description="Train a StarCoder2 model (Megatron's flag names).",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file setting the same keys (dashes or underscores)")
    for f in fields(TrainConfig):
        flag = _flag(f.name)
        default = TrainConfig.__dataclass_fields__[f.name]
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true")
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false")
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, nargs="+")
        else:
            parser.add_argument(flag, dest=f.name, type=_caster(kind))
        del default
    return parser


def _caster(kind: str):
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def _coerce(name: str, value: Any, where: str = "config") -> Any:
    """A YAML value as the command line would read it, or a ConfigError naming the key: an int
    key takes an integer (or a string of one), never 2.9 or true; a float key takes a number;
    a bool key takes true/false; null only where the flag has no default value."""
    f = TrainConfig.__dataclass_fields__[name]
    kind = f.type if isinstance(f.type, str) else str(f.type)
    flag = _flag(name)
    if value is None:
        if "Optional" in kind:
            return None
        raise ConfigError(f"{where}: key {name!r} is null (~); give a value or leave the key out "
                          f"(the default of {flag} applies)")
    bad = f"{where}: key {name!r} must be {{}}, got {value!r} ({type(value).__name__})"
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(bad.format("true or false"))
    if kind.startswith("list"):
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                           for v in value):
            return [str(v) for v in value]
        raise ConfigError(bad.format("a list of strings or one string"))
    caster = _caster(kind)
    if caster is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(bad.format("an integer"))
    if caster is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(bad.format("a number"))
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)  # `split: 100` or `exit_signal: 10` mean what the same text means on the command line
    raise ConfigError(bad.format("a string"))


def _unique_key_loader():
    """PyYAML's SafeLoader, refusing a key given twice in one mapping (it keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                norm = str(key).lstrip("-").replace("-", "_")
                if norm in seen:
                    raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice "
                                      f"(also as {seen[norm]!r} on line {seen[norm + ':line']})")
                seen[norm] = key
                seen[norm + ":line"] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml_config(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    try:
        loader = _unique_key_loader()(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in TrainConfig.__dataclass_fields__:
            raise ConfigError(f"{path}: unknown key {key!r}")
        out[name] = _coerce(name, value, str(path))
    return out


def parse_train_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """`--config FILE` first, then command-line flags override it."""
    parser = _build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown argument(s): {' '.join(unknown)}")
    values: dict[str, Any] = {}
    cli = vars(ns)
    if "config" in cli:
        values.update(load_yaml_config(cli.pop("config")))
    values.update(cli)
    # `--data-path "0.3 A 0.7 B"` arrives as one string; split it like Megatron does.
    for key in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        if key in values and values[key] is not None:
            values[key] = [tok for item in values[key] for tok in str(item).split()]
    if "sliding_window" in values and values["sliding_window"] == 0:
        values["sliding_window"] = 0
    return TrainConfig(**values).validate()
