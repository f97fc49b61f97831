"""Typed, frozen experiment configuration: one dataclass per component.

A TOML experiment file maps 1:1 onto these dataclasses (``[fl] rounds = 5`` is
``FLConfig.rounds``); the command line overrides any field with a dotted key
(``fl.rounds=5``; the top-level ``seed=0`` has no section). Everything is validated
here, before any model or dataset is loaded, and every error names the key and the
valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedlpp import registry

SERVER_RULES = ("mean", "delta")
GRANULARITIES = ("block", "row", "tensor")
QUANT_BITS = (1, 2, 3, 4, 8)
UPLINK_CHOICES = (32, 8, 4, 2)  # uplink.bits: 32 sends float32; fewer round it (quant.stochastic.UPLINK_BITS)
PRIVACY_MODES = ("none", "dp_sgd", "client_dp")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKBONE_QUANTIZATIONS = ("none", "nf4")  # model.quantize: the frozen base's weights (not quant.*, the broadcast's)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
POOLINGS = ("auto", "cls", "mean")  # auto: what the checkpoint declares (models.pooling.declared_pooling)
ACCOUNTANTS = ("rdp", "prv")
CLIENT_SAMPLING = ("fixed", "poisson")
WEIGHTINGS = ("auto", "examples", "uniform")  # fl.weighting: what a client's update weighs in the mean
MIN_GROUP = 16  # fewest values per quantization scale (model privacy, see QuantConfig)
# Beyond these a run can only diverge: alpha / r scales every LoRA update (8 to 64 is usual), and the
# server's step is the clients' mean step times server_lr (FedOpt papers use up to ~3).
MAX_LORA_ALPHA = 4096.0
MAX_SERVER_LR = 10.0
MAX_DELTA = 0.1  # a delta this large is no guarantee at all
MIN_NOISE = 1e-12  # a smaller sigma makes the accountant divide by zero (1e-300 did); 1e-9 is a test's "no noise"
# Every numeric key's range: beyond it a run could only hang (an accountant precomputing 10^12 rounds, decoding
# 10^9 tokens), run out of memory, or overflow and divide by zero; a real run is far inside each.
LIMITS: dict[str, tuple[float, float]] = {
    "seed": (0, 2**63 - 1),
    "model.max_length": (8, 131_072),
    "lora.r": (1, 1024),
    "quant.block_size": (MIN_GROUP, 1 << 20),
    "uplink.block_size": (1, 1 << 20),
    "data.num_train": (0, 100_000_000),
    "data.num_eval": (0, 10_000_000),
    "data.alpha": (1e-3, 1e6),
    "fl.rounds": (1, 100_000),
    "fl.num_clients": (1, 1_000_000),
    "fl.clients_per_round": (1, 1_000_000),
    "fl.local_steps": (1, 100_000),
    "train.batch_size": (1, 65_536),
    "train.lr": (1e-12, 100),
    "train.weight_decay": (0, 10),
    "train.max_grad_norm": (0, 1e6),
    "train.proximal_mu": (0, 1e6),
    "eval.every": (1, 100_000),
    "eval.batch_size": (1, 4096),
    "eval.max_new_tokens": (1, 4096),
    "eval.num_beams": (1, 64),
    "eval.no_repeat_ngram_size": (0, 64),
    "eval.length_penalty": (-10, 10),
    "algorithm.server_tau": (1e-12, 1),
    "secagg.clip_range": (1e-12, 1e6),
    "secagg.l2_bound": (1e-9, 1e6),
    "privacy.epsilon": (0, 1000),
    "privacy.noise_multiplier": (0, 1000),
    "privacy.clip_norm": (1e-6, 1e6),
    "privacy.budget": (0, 1000),
    "flower.connect_timeout": (0, 7 * 24 * 3600),
    "flower.round_timeout": (0, 7 * 24 * 3600),
    "flower.client_cpus": (0, 1024),
    "flower.client_gpus": (0, 64),
}


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names it."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_finite(cfg: Any) -> None:
    """Every float key is a finite number: inf passes every "> 0" check and then can only fail (NaN, a crash)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float):
                _require(math.isfinite(value), f"{section.name}.{f.name}", f"must be a finite number, got {value}")


def _require_limits(cfg: Any) -> None:
    """Every key of LIMITS within its range (the sections have checked the finer rules already)."""
    values = flat_tree(to_tree(cfg))
    for key, (low, high) in LIMITS.items():
        value = values[key]
        _require(
            low <= value <= high,
            key,
            f"must be in [{low:g}, {high:g}], got {value}: a run beyond it could only hang, run out of memory or overflow",
        )


def _choice(value: object, key: str, choices: tuple[Any, ...]) -> None:
    _require(value in choices, key, f"got {value!r}; valid choices are {', '.join(map(repr, choices))}")


def _registered(value: str, names: registry.Registry) -> None:
    """A name the registry of its kind holds (``fedlpp/registry.py``: built in or from an installed plugin)."""
    _choice(value, names.key, names.names())


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"  # the frozen backbone the adapter is trained on
    max_length: int = 96  # tokens per training sequence (prompt + completion)
    pooling: str = "auto"  # classifiers: auto (what the checkpoint declares: mean for minilm-l6) | cls | mean
    quantize: str = "none"  # the frozen backbone in 4 bits: none | nf4 (QLoRA via bitsandbytes; quant.* is FedLPP's broadcast)

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must not be empty")
        _require(self.max_length >= 8, "model.max_length", f"must be >= 8, got {self.max_length}")
        _choice(self.pooling, "model.pooling", POOLINGS)
        _choice(self.quantize, "model.quantize", BACKBONE_QUANTIZATIONS)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # scaling numerator: delta W = (alpha / r) * B A
    dropout: float = 0.0  # off by default: keeps client steps deterministic and DP-friendly
    target_modules: tuple[str, ...] = ()  # empty = the model family's default (q_proj,v_proj / query,value)

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _require(0 < self.alpha <= MAX_LORA_ALPHA, "lora.alpha", f"must be in (0, {MAX_LORA_ALPHA:g}], got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "fedlpp"  # the algorithm: what is broadcast, what is trained, how the server moves
    server_lr: float = 1.0  # the server rule's step size eta_s (docs/algorithms.md); 1.0 is plain FedAvg
    server_rule: str = "mean"  # FedLPP only: "mean" = move to the clients' mean adapter, "delta" = add mean delta to theta
    server_optimizer: str = "none"  # what the server does with each round's proposed step (state clients never see)
    server_momentum: float = 0.9  # beta of "momentum"; beta1 of "adam" and "yogi"
    server_beta2: float = 0.99  # beta2 of "adam" and "yogi" (Reddi et al. 2021)
    server_tau: float = 1e-3  # tau of "adam" and "yogi": the adaptivity floor (Reddi et al. 2021)
    server_opt_lr: float = 0.01  # eta of "adam" and "yogi": each coordinate moves about this much per round; tune it

    def __post_init__(self) -> None:
        _registered(self.name, registry.ALGORITHMS)
        _choice(self.server_rule, "algorithm.server_rule", SERVER_RULES)
        _require(
            0 < self.server_lr <= MAX_SERVER_LR, "algorithm.server_lr", f"must be in (0, {MAX_SERVER_LR:g}], got {self.server_lr}"
        )
        _registered(self.server_optimizer, registry.SERVER_OPTIMIZERS)
        _require(0.0 <= self.server_momentum < 1.0, "algorithm.server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        _require(0.0 <= self.server_beta2 < 1.0, "algorithm.server_beta2", f"must be in [0, 1), got {self.server_beta2}")
        _require(self.server_tau > 0, "algorithm.server_tau", f"must be > 0, got {self.server_tau}")
        _require(0 < self.server_opt_lr <= 1, "algorithm.server_opt_lr", f"must be in (0, 1], got {self.server_opt_lr}")


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 2  # w: bits per value of the broadcast adapter (FedLPP)
    granularity: str = "block"  # one absmax scale per block / row / tensor: the model-privacy knob (docs/model-privacy.md)
    block_size: int = 64  # values per scale when granularity = "block"

    def __post_init__(self) -> None:
        _choice(self.bits, "quant.bits", QUANT_BITS)
        _choice(self.granularity, "quant.granularity", GRANULARITIES)
        _require(
            self.block_size >= MIN_GROUP,
            "quant.block_size",
            f"must be >= {MIN_GROUP}, got {self.block_size}: with tiny blocks the float16 scales are "
            "themselves a copy of the adapter, and the broadcast protects nothing",
        )


@dataclass(frozen=True)
class UplinkConfig:
    bits: int = 32  # b: bits per value of each client's update; 32 = float32, 8 | 4 | 2 = unbiased stochastic rounding
    block_size: int = 64  # values per float16 scale of a compressed update

    def __post_init__(self) -> None:
        _choice(self.bits, "uplink.bits", UPLINK_CHOICES)
        _require(self.block_size >= 1, "uplink.block_size", f"must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class DataConfig:
    task: str = "weather"  # the task: weather is built in, jsonl is your own file
    path: str = ""  # local dataset directory (e.g. ../shared/data/e2e), or the file for jsonl; empty = built in / hub
    eval_path: str = ""  # jsonl only: a separate evaluation file; empty = hold out a tenth of data.path
    hf_id: str = ""  # Hugging Face dataset id, downloaded only when given
    num_train: int = 0  # 0 = all (weather: 2000)
    num_eval: int = 0  # 0 = the task's default held-out size
    partition: str = "iid"  # how the training examples are split across the clients
    key: str = ""  # what dirichlet / by_key split on: an attribute (e2e: eatType, food, area...; dialogsum: topic; dart: source); empty = the task's own (label, eatType, topic, source)
    alpha: float = 0.5  # Dirichlet concentration for dirichlet / quantity_skew

    def __post_init__(self) -> None:
        _registered(self.task, registry.TASKS)
        _registered(self.partition, registry.PARTITIONERS)
        _require(self.alpha > 0, "data.alpha", f"must be > 0, got {self.alpha}")
        _require(self.num_train >= 0, "data.num_train", "must be >= 0")
        _require(self.num_eval >= 0, "data.num_eval", "must be >= 0")
        _require(not (self.path and self.hf_id), "data.path", "set data.path or data.hf_id, not both")
        by_group = [e.name for e in registry.PARTITIONERS.entries() if e.traits.get("by_group")]
        _require(
            not self.key or self.partition in by_group,
            "data.key",
            f"is what a {' or '.join(by_group)} partition splits on; data.partition is {self.partition!r}",
        )
        _require(
            not self.eval_path or registry.TASKS.get(self.task).traits.get("eval_file", False),
            "data.eval_path",
            f"is for data.task=jsonl; task {self.task!r} takes its evaluation split from its own files",
        )
        _require(self.task != "jsonl" or bool(self.path), "data.path", "data.task=jsonl needs data.path=FILE.jsonl")


@dataclass(frozen=True)
class FLConfig:
    rounds: int = 6  # communication rounds
    num_clients: int = 4  # N: clients holding data
    clients_per_round: int = 2  # K: clients sampled each round (without replacement)
    local_steps: int = 8  # E: optimizer steps per sampled client per round
    weighting: str = "auto"  # a client's weight in the mean: auto (examples where the server split the data, uniform in a deployment or a small SecAgg field) | examples | uniform

    def __post_init__(self) -> None:
        _choice(self.weighting, "fl.weighting", WEIGHTINGS)
        _require(self.rounds >= 1, "fl.rounds", f"must be >= 1, got {self.rounds}")
        _require(self.num_clients >= 1, "fl.num_clients", f"must be >= 1, got {self.num_clients}")
        _require(
            1 <= self.clients_per_round <= self.num_clients,
            "fl.clients_per_round",
            f"must be in [1, fl.num_clients={self.num_clients}], got {self.clients_per_round}",
        )
        _require(self.local_steps >= 1, "fl.local_steps", f"must be >= 1, got {self.local_steps}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # examples per local step (the expected Poisson batch under DP-SGD; its default there: 256)
    optimizer: str = "adamw"  # adamw | sgd (a fresh optimizer every round: clients keep no state between rounds)
    lr: float = 1e-3  # client learning rate (DP-SGD's default: 1e-2)
    momentum: float = 0.0  # sgd only: heavy-ball momentum within a round
    weight_decay: float = 0.01  # decoupled (adamw) or L2 (sgd) weight decay (DP-SGD's default: 0)
    max_grad_norm: float = 0.0  # 0 = no gradient clipping
    proximal_mu: float = 0.0  # FedProx (Li et al. 2020): adds (mu/2)||w - w_start||^2 to each local step's loss; 0 = off
    device: str = "auto"  # where clients train and evaluate: auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # the frozen backbone's dtype, compute under autocast: fp32 | bf16 | fp16 (LoRA stays fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            bool(DEVICE_PATTERN.fullmatch(self.device)),
            "train.device",
            f"got {self.device!r}; valid devices are auto, cpu, cuda, cuda:N (N = 0, 1, ...) and mps",
        )
        _choice(self.precision, "train.precision", PRECISIONS)
        _choice(self.optimizer, "train.optimizer", OPTIMIZERS)
        if self.optimizer == "adamw":
            _require(0 < self.lr <= 1, "train.lr", f"must be in (0, 1] (AdamW's step size), got {self.lr}")
            _require(self.momentum == 0, "train.momentum", 'applies to train.optimizer = "sgd" only (AdamW has its own betas)')
        else:
            _require(0 < self.lr <= 100, "train.lr", f"must be in (0, 100] (SGD's step size), got {self.lr}")
            _require(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _require(self.proximal_mu >= 0, "train.proximal_mu", f"must be >= 0, got {self.proximal_mu}")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 3  # evaluate every k rounds; the last round is always evaluated (generation is the slow part)
    batch_size: int = 16  # evaluation examples per forward pass / generation batch
    max_new_tokens: int = 48  # decoding stops at the first newline (EOS for multi-line tasks) or this many tokens
    num_beams: int = 1  # 1 = greedy; the LoRA paper's E2E setting is 10 beams, length_penalty 0.9, no_repeat_ngram_size 4
    length_penalty: float = 1.0  # beam search: score / length^length_penalty (< 1 favours shorter outputs)
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size (0 = off)

    def __post_init__(self) -> None:
        _require(self.every >= 1, "eval.every", f"must be >= 1, got {self.every}")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _require(self.num_beams >= 1, "eval.num_beams", f"must be >= 1, got {self.num_beams}")
        _require(self.no_repeat_ngram_size >= 0, "eval.no_repeat_ngram_size", f"must be >= 0, got {self.no_repeat_ngram_size}")


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = False  # the server sees only the sum of the round's updates (SecAgg / SecAgg+)
    clip_range: float = 1.0  # declared bound on every value a client sends; beyond it the client drops out (never clipped)
    scale_bits: int = 20  # fixed-point resolution 2^-scale_bits in Z_2^32
    threshold: float = 0.6  # fraction of a client's neighbours needed to unmask it (> 0.5)
    graph: str = "complete"  # complete (SecAgg) | sparse (SecAgg+, O(log n) neighbours)
    prg: str = "aes256-ctr"  # mask expansion: aes256-ctr | chacha20 (faster on CPUs without AES instructions)
    modulus_bits: int = 32  # b: the field Z_2^b the sum lives in, b bits a value on the wire; < 32 rotates each update into it
    l2_bound: float = 10.0  # modulus_bits < 32: a longer update (L2) is scaled down to it (client_dp: privacy.clip_norm)
    min_survivors: float = 0.0  # fewest inputs in a sum, share of clients_per_round (0: the threshold's floor); DP counts it

    def __post_init__(self) -> None:
        from fedlpp.secagg.params import MIN_MODULUS_BITS, MODULUS_BITS, PRGS  # here: it loads the cryptography stack

        _require(self.clip_range > 0, "secagg.clip_range", f"must be > 0, got {self.clip_range}")
        _require(
            MIN_MODULUS_BITS <= self.modulus_bits <= MODULUS_BITS,
            "secagg.modulus_bits",
            f"must be in [{MIN_MODULUS_BITS}, {MODULUS_BITS}], got {self.modulus_bits}",
        )
        _require(self.l2_bound > 0, "secagg.l2_bound", f"must be > 0, got {self.l2_bound}")
        _require(1 <= self.scale_bits <= 28, "secagg.scale_bits", f"must be in [1, 28], got {self.scale_bits}")
        _require(0.5 < self.threshold <= 1.0, "secagg.threshold", f"must be in (0.5, 1], got {self.threshold}")
        _require(
            0.0 <= self.min_survivors <= 1.0,
            "secagg.min_survivors",
            f"must be a fraction of fl.clients_per_round in [0, 1], got {self.min_survivors}",
        )
        _choice(self.graph, "secagg.graph", ("complete", "sparse"))
        _choice(self.prg, "secagg.prg", PRGS)


@dataclass(frozen=True)
class FlowerConfig:
    connect_timeout: float = 120.0  # seconds to wait for fl.num_clients nodes before the first round
    round_timeout: float = 3600.0  # seconds to wait for a round's replies; a node still silent then counts as failed
    client_cpus: float = 1.0  # simulation only: Ray CPUs per virtual client (each actor runs torch with one thread)
    client_gpus: float = 0.0  # simulation only: Ray GPUs per virtual client; 0.5 lets two share one GPU (0, in (0, 1], or whole)

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.connect_timeout) and self.connect_timeout > 0,
            "flower.connect_timeout",
            f"must be a finite number of seconds > 0, got {self.connect_timeout}",
        )
        _require(
            math.isfinite(self.round_timeout) and self.round_timeout > 0,
            "flower.round_timeout",
            f"must be a finite number of seconds > 0, got {self.round_timeout}",
        )
        _require(
            math.isfinite(self.client_cpus) and self.client_cpus > 0,
            "flower.client_cpus",
            f"must be a finite number of CPUs > 0, got {self.client_cpus}",
        )
        _require(
            math.isfinite(self.client_gpus) and self.client_gpus >= 0,
            "flower.client_gpus",
            f"must be a finite number of GPUs >= 0, got {self.client_gpus}",
        )
        _require(
            self.client_gpus <= 1 or float(self.client_gpus).is_integer(),
            "flower.client_gpus",
            f"got {self.client_gpus}; Ray shares a GPU only by a fraction <= 1 (0.5: two clients per GPU), "
            "above 1 it must be a whole number of GPUs",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str = "none"  # none | dp_sgd (each client's examples, Opacus) | client_dp (each client's whole data, DP-FedAvg)
    epsilon: float = 0.0  # target epsilon: the noise multiplier is calibrated to it before training (0 = not set)
    noise_multiplier: float = 0.0  # sigma, explicit instead of a target epsilon (0 = not set)
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP; below 1 / the number of examples (or clients)
    clip_norm: float = 1.0  # dp_sgd: per-example gradient norm C; client_dp: client delta norm S
    accountant: str = "rdp"  # rdp | prv (prv is tighter; needs Poisson sampling)
    budget: float = 0.0  # stop before epsilon would exceed this (0 = privacy.epsilon when set, else no limit)
    client_sampling: str = "fixed"  # client_dp: fixed (K of N per round) | poisson (each client with prob K/N)
    secure_noise: bool = False  # draw DP noise and Poisson samples from the OS CSPRNG (not reproducible from the seed)

    def __post_init__(self) -> None:
        _choice(self.mode, "privacy.mode", PRIVACY_MODES)
        _choice(self.accountant, "privacy.accountant", ACCOUNTANTS)
        _choice(self.client_sampling, "privacy.client_sampling", CLIENT_SAMPLING)
        _require(self.epsilon >= 0, "privacy.epsilon", f"must be >= 0, got {self.epsilon}")
        _require(self.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        _require(
            0 < self.delta < MAX_DELTA,
            "privacy.delta",
            f"must be in (0, {MAX_DELTA:g}), got {self.delta}: delta is the chance the guarantee fails outright "
            "(the convention: below 1 / the number of examples or clients)",
        )
        _require(
            self.noise_multiplier == 0 or self.noise_multiplier >= MIN_NOISE,
            "privacy.noise_multiplier",
            f"must be 0 (not set) or at least {MIN_NOISE:g}, got {self.noise_multiplier}: below it the accountant's "
            "arithmetic overflows or divides by zero",
        )
        _require(self.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(self.budget >= 0, "privacy.budget", f"must be >= 0, got {self.budget}")
        if self.mode == "none":
            unused = {
                "epsilon": self.epsilon,
                "noise_multiplier": self.noise_multiplier,
                "budget": self.budget,
                "client_sampling": self.client_sampling != "fixed",
                "secure_noise": self.secure_noise,
            }
            for key, value in unused.items():
                _require(
                    not value, f"privacy.{key}", "is set but privacy.mode is 'none'; choose privacy.mode=dp_sgd or client_dp"
                )
            return
        _require(
            (self.epsilon > 0) != (self.noise_multiplier > 0),
            "privacy.epsilon",
            f"privacy.mode={self.mode!r} needs exactly one of privacy.epsilon (a target, sigma is calibrated) "
            "or privacy.noise_multiplier (explicit sigma)",
        )
        _require(
            self.client_sampling == "fixed" or self.mode == "client_dp",
            "privacy.client_sampling",
            "'poisson' samples clients for client-level DP; use it with privacy.mode=client_dp",
        )
        _require(
            not (self.mode == "client_dp" and self.client_sampling == "fixed" and self.accountant == "prv"),
            "privacy.accountant",
            "'prv' assumes Poisson sampling; with fixed-size client sampling use 'rdp', or set privacy.client_sampling=poisson",
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def stop_at(self) -> float:
        """The epsilon a run must not exceed (0 = no limit)."""
        return self.budget or self.epsilon


@dataclass(frozen=True)
class ExperimentConfig:
    seed: int = 0  # every random choice of the run derives from this
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)  # the Flower engine only (fedlpp run --engine flower, flwr run)

    def __post_init__(self) -> None:
        _require_finite(self)
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require_limits(self)
        _require(
            not (self.privacy.mode == "dp_sgd" and self.train.max_grad_norm > 0),
            "train.max_grad_norm",
            "with privacy.mode=dp_sgd every example's gradient is clipped to privacy.clip_norm; leave train.max_grad_norm at 0",
        )
        _require(
            not (self.privacy.mode == "dp_sgd" and self.train.proximal_mu > 0),
            "train.proximal_mu",
            "FedProx's term is not supported with privacy.mode=dp_sgd (Opacus makes each step's gradient itself); "
            "use privacy.mode=client_dp or train.proximal_mu=0",
        )
        _require(
            not (self.privacy.mode == "dp_sgd" and self.train.precision == "fp16"),
            "train.precision",
            "fp16 needs loss scaling, which scales each example's gradient before DP-SGD clips it to "
            "privacy.clip_norm (the clip would then bound the wrong quantity); use bf16 or fp32 with privacy.mode=dp_sgd",
        )
        _require(
            not (self.uplink.bits < 32 and self.secagg.enabled),
            "uplink.bits",
            f"{self.uplink.bits}: under secure aggregation the uplink is the field's size: set secagg.modulus_bits "
            "(12 to 32) and leave uplink.bits at 32",
        )
        _require(
            self.secagg.enabled or self.secagg.modulus_bits == 32,
            "secagg.modulus_bits",
            f"{self.secagg.modulus_bits} applies only with secagg.enabled=true; to compress updates without secure "
            "aggregation use uplink.bits",
        )
        _require(
            self.secagg.enabled or self.secagg.min_survivors == 0,
            "secagg.min_survivors",
            f"{self.secagg.min_survivors} applies only with secagg.enabled=true (without it no sum is masked)",
        )
        small_field = self.secagg.enabled and self.secagg.modulus_bits < 32
        _require(
            not (small_field and self.fl.weighting == "examples"),
            "fl.weighting",
            f"'examples' cannot be carried in a {self.secagg.modulus_bits}-bit field (secagg.modulus_bits): every "
            "update weighs 1 there; use fl.weighting=uniform or auto",
        )
        _require(
            not (self.uplink.bits < 32 and self.privacy.mode == "client_dp"),
            "uplink.bits",
            f"{self.uplink.bits}: client-level DP refuses an update whose norm exceeds privacy.clip_norm, and random "
            "rounding can push a clipped update past it; use uplink.bits=32 with privacy.mode=client_dp",
        )
        _require(
            not (self.secagg.enabled and self.privacy.client_sampling == "poisson"),
            "privacy.client_sampling",
            "'poisson' gives rounds with any number of clients, but secure aggregation is set up for "
            "fl.clients_per_round of them and aborts below 3; use 'fixed' with secagg.enabled",
        )
        _require(
            not (self.privacy.budget and self.privacy.epsilon and self.privacy.budget < self.privacy.epsilon),
            "privacy.budget",
            f"{self.privacy.budget} is below the target privacy.epsilon={self.privacy.epsilon}: "
            "the run would stop before the rounds it was calibrated for",
        )
        _require(
            not (self.secagg.enabled and self.fl.clients_per_round < 3),
            "fl.clients_per_round",
            "must be >= 3 with secagg.enabled: with two clients the sum reveals the other's update",
        )
        if not registry.ALGORITHMS.get(self.algorithm.name).traits.get("quantized_broadcast"):
            return  # the model-privacy checks below are about a quantized broadcast
        _require(
            not (self.quant.granularity == "row" and self.lora.r < MIN_GROUP),
            "quant.granularity",
            f"'row' gives each lora_B row its own scale over only lora.r={self.lora.r} values "
            f"(fewer than {MIN_GROUP}): the scales would nearly copy B; use 'block' or 'tensor'",
        )
        _require(
            not (self.algorithm.server_rule == "mean" and self.fl.clients_per_round < 2),
            "fl.clients_per_round",
            "must be >= 2 with algorithm.server_rule='mean': with one client per round the server's "
            "adapter would be exactly that client's adapter",
        )


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(ExperimentConfig)[f.name] for f in dataclasses.fields(ExperimentConfig) if f.name != "seed"
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, target: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field's declared type."""
    if typing.get_origin(target) in (tuple, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, (list, tuple)), key, f"expected a list of strings, got {value!r}")
        return tuple(_coerce(v, str, key) for v in value)
    if target is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if target in (int, float):
        what = "an integer" if target is int else "a number"
        if isinstance(value, str):
            try:
                return target(value)
            except ValueError:
                raise ConfigError(f"{key}: expected {what}, got {value!r}") from None
        ok = isinstance(value, int) if target is int else isinstance(value, (int, float))
        _require(ok and not isinstance(value, bool), key, f"expected {what}, got {value!r}")
        return target(value)
    if target is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {target}")  # pragma: no cover - programming error


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key; valid keys in [{name}] are {', '.join(sorted(types_))}")
    return cls(**{k: _coerce(v, types_[k], f"{name}.{k}") for k, v in values.items()})


# What privacy.mode = "dp_sgd" sets when the file and the command line leave these keys unset:
# the recipe measured on SST-2 (README, "DP that learns"). Per-example noise is sigma C / batch,
# so DP-SGD needs large Poisson batches; AdamW at lr 1e-2 then learns in a few steps.
DP_SGD_DEFAULTS: dict[str, dict[str, Any]] = {"train": {"batch_size": 256, "lr": 1e-2, "weight_decay": 0.0}}


def _with_mode_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with DP_SGD_DEFAULTS filled in where privacy.mode is dp_sgd and the keys are unset."""
    privacy = tree.get("privacy")
    if not isinstance(privacy, dict) or privacy.get("mode") != "dp_sgd":
        return tree
    filled = dict(tree)
    for section, defaults in DP_SGD_DEFAULTS.items():
        given = filled.get(section, {})
        if isinstance(given, dict):  # anything else is reported as a bad section below
            filled[section] = {**defaults, **given}
    return filled


def build_config(tree: dict[str, Any]) -> ExperimentConfig:
    """Build a validated config from a nested dict (the shape of a TOML file)."""
    tree = _with_mode_defaults(tree)
    unknown = sorted(set(tree) - set(SECTIONS) - {"seed"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section or key; valid ones are seed, {', '.join(SECTIONS)}")
    kwargs: dict[str, Any] = {}
    if "seed" in tree:
        kwargs["seed"] = _coerce(tree["seed"], int, "seed")
    for name in SECTIONS:
        section = tree.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a table of keys, got {section!r}")
        kwargs[name] = _build_section(name, section)
    return ExperimentConfig(**kwargs)


def to_tree(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as a nested dict of plain values (TOML/JSON friendly)."""
    tree = dataclasses.asdict(cfg)
    for section in tree.values():
        if isinstance(section, dict):
            for k, v in section.items():
                if isinstance(v, tuple):
                    section[k] = list(v)
    return tree


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``section.key=value`` into its key path and raw value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{text!r}: overrides look like section.key=value (for example fl.rounds=3)")
    path = key.strip().split(".")
    if len(path) > 2 or not all(path):
        raise ConfigError(f"{key}: overrides look like section.key=value or seed=value")
    return path, value.strip()


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with dotted ``key=value`` overrides applied (values stay raw)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            out[path[0]] = value
        else:
            section = out.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{path[0]}: is not a section")
            section[path[1]] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" if not p.exists() else f"{p} is not a file")
    try:
        return tomllib.loads(p.read_bytes().decode("utf-8-sig"))  # a byte-order mark (Windows editors) is read past
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the TOML file (if any), then command-line overrides; validated."""
    tree = read_toml(path) if path else {}
    return build_config(apply_overrides(tree, overrides or []))


def write_toml(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(to_tree(cfg)))


def flat_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A config tree (``to_tree``) by dotted key: {"fl.rounds": 6, "seed": 0, ...}."""
    flat: dict[str, Any] = {}
    for section, values in tree.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat


def changed_keys(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a, b = flat_tree(to_tree(old)), flat_tree(to_tree(new))
    return [k for k in a if a[k] != b[k]]
