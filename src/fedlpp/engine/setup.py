"""Build everything a run needs once: task data, per-client features, model, algorithm."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedlpp.algorithms.ffa_lora import trained_names
from fedlpp.algorithms.spec import AlgorithmSpec, get_algorithm
from fedlpp.config import ConfigError, ExperimentConfig
from fedlpp.data import TaskData, collate, encode_for_classification, encode_for_generation, encode_prompts, load_task, partition
from fedlpp.engine.secure import SecureAggregator, make_aggregator
from fedlpp.evaluation.evaluate import Decoding, EvalSet
from fedlpp.models.backbone import Backbone, load_backbone
from fedlpp.models.lora import Adapter, adapter_shapes, attach_lora, initial_adapter
from fedlpp.privacy.plan import PrivacyPlan, make_plan
from fedlpp.privacy.randomness import randomness
from fedlpp.quant import QuantSpec
from fedlpp.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """The shared, read-only state of a run: one backbone in memory for all clients."""

    cfg: ExperimentConfig
    task: TaskData
    backbone: Backbone
    model: PeftModel
    spec: AlgorithmSpec
    shapes: dict[str, tuple[int, ...]]
    trained: list[str]  # adapter tensors clients train and send
    client_features: list[list[dict]]  # tokenised training examples of each client
    evalset: EvalSet
    decoding: Decoding
    a_seed: int  # seed of the LoRA A matrices (sent to clients by FFA variants)
    secure: SecureAggregator | None = None  # set when secagg.enabled: the server sees only sums
    privacy: PrivacyPlan | None = None  # set when privacy.mode is not none

    @property
    def pad_id(self) -> int:
        return int(self.backbone.tokenizer.pad_token_id)

    def initial_adapter(self) -> Adapter:
        return initial_adapter(self.shapes, self.a_seed)


def algorithm_spec(cfg: ExperimentConfig) -> AlgorithmSpec:
    quant = QuantSpec(bits=cfg.quant.bits, granularity=cfg.quant.granularity, block_size=cfg.quant.block_size)
    return get_algorithm(cfg.algorithm.name, quant, cfg.algorithm.server_rule, cfg.algorithm.server_lr)


def load_task_data(cfg: ExperimentConfig) -> TaskData:
    d = cfg.data
    return load_task(d.task, path=d.path, hf_id=d.hf_id, num_train=d.num_train, num_eval=d.num_eval, seed=cfg.seed)


def encode_train(task: TaskData, backbone: Backbone, max_length: int) -> list[dict]:
    if task.kind == "classification":
        return encode_for_classification(backbone.tokenizer, task.train, max_length)
    return encode_for_generation(backbone.tokenizer, task.train, max_length)


def build_evalset(task: TaskData, backbone: Backbone, max_length: int) -> EvalSet:
    tok = backbone.tokenizer
    if task.kind == "classification":
        return EvalSet("classification", tuple(encode_for_classification(tok, task.eval, max_length)))
    # Loaders set an eval example's target to its first reference: the loss is measured
    # against it, BLEU/ROUGE-L against all of them.
    features = encode_for_generation(tok, task.eval, max_length)
    prompts = encode_prompts(tok, task.eval, max_length)
    references = tuple(e.references or (e.target,) for e in task.eval)
    return EvalSet("generation", tuple(features), tuple(prompts), references)


def build_run(cfg: ExperimentConfig) -> RunContext:
    """Data, then model, then algorithm — in that order, so data errors come before a model load."""
    task = load_task_data(cfg)
    parts = partition(cfg.data.partition, task.train, cfg.fl.num_clients, alpha=cfg.data.alpha, seed=cfg.seed)
    privacy = privacy_plan(cfg, [len(p) for p in parts]) if cfg.privacy.enabled else None  # before the slow model load
    if cfg.secagg.enabled and privacy is not None and privacy.mode == "client_dp":
        check_noise_fits_range(cfg, privacy)
    backbone = load_backbone(cfg.model.name, task.kind, task.num_labels)
    model = attach_lora(backbone, task.kind, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    features = encode_train(task, backbone, cfg.model.max_length)
    spec = algorithm_spec(cfg)
    shapes = adapter_shapes(model)
    client_features = [[features[i] for i in part] for part in parts]
    secure = None
    if cfg.secagg.enabled:
        weight_bound = max(len(f) for f in client_features)
        secure = make_aggregator(cfg.secagg, cfg.fl.num_clients, cfg.fl.clients_per_round, weight_bound)
    return RunContext(
        cfg=cfg,
        task=task,
        backbone=backbone,
        model=model,
        spec=spec,
        shapes=shapes,
        trained=trained_names(shapes, spec.freeze_a),
        client_features=client_features,
        evalset=build_evalset(task, backbone, cfg.model.max_length),
        decoding=Decoding(cfg.eval.batch_size, cfg.eval.max_new_tokens),
        a_seed=derive_seed(cfg.seed, "lora_a") % (2**31),
        secure=secure,
        privacy=privacy,
    )


def privacy_plan(cfg: ExperimentConfig, client_sizes: list[int]) -> PrivacyPlan:
    """Sigma for the whole run, calibrated against the rounds each client will really join."""
    fl = cfg.fl
    participation = dict.fromkeys(range(fl.num_clients), 0)
    for round_ in range(1, fl.rounds + 1):
        for c in sample_clients(cfg.seed, round_, fl.num_clients, fl.clients_per_round):
            participation[c] += 1
    return make_plan(cfg.privacy, client_sizes, cfg.train.batch_size, fl.local_steps, participation, fl.rounds, fl.clients_per_round)


# A client's noise share may reach this many standard deviations on some coordinate without
# leaving the range (over ~10^6 Gaussian values the largest is about 5 sigma).
NOISE_SHARE_TAILS = 6.0


def check_noise_fits_range(cfg: ExperimentConfig, plan: PrivacyPlan) -> None:
    """Under SecAgg a client sends clipped delta + noise share; out of range it would drop out every round."""
    share_std = plan.noise_multiplier * plan.clip_norm / plan.expected_clients**0.5
    need = plan.clip_norm + NOISE_SHARE_TAILS * share_std
    if cfg.secagg.clip_range < need:
        raise ConfigError(
            f"secagg.clip_range: {cfg.secagg.clip_range:g} is too small for client-level DP: a client sends its delta "
            f"(norm <= privacy.clip_norm={plan.clip_norm:g}) plus a noise share of std {share_std:.3g}, so values reach "
            f"{need:.3g}; raise secagg.clip_range to at least that (and lower secagg.scale_bits if it then overflows)"
        )


def round_clients(cfg: ExperimentConfig, round_: int) -> list[int]:
    """This round's clients: K of N, or each with probability K/N under Poisson client sampling."""
    fl = cfg.fl
    if cfg.privacy.mode == "client_dp" and cfg.privacy.client_sampling == "poisson":
        rng = randomness(cfg.privacy.secure_noise, derive_seed(cfg.seed, "client_sampling", round_))
        return [int(c) for c in (rng.uniform(fl.num_clients) < fl.clients_per_round / fl.num_clients).nonzero()[0]]
    return sample_clients(cfg.seed, round_, fl.num_clients, fl.clients_per_round)


def sample_clients(seed: int, round_: int, num_clients: int, k: int) -> list[int]:
    """The K clients of a round, without replacement; a pure function of (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, "clients", round_))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def client_batches(
    features: Sequence[dict], steps: int, batch_size: int, pad_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches drawn by reshuffled passes over the client's data (seeded)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.permutation(len(features)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([features[i] for i in chosen], pad_id)
