"""Build what each party of a run holds, from the config: the server's side and each client's.

The server holds the config, the model, the global adapter's shapes, the evaluation set
and public counts (each client's number of examples) — never a client's training data. A
client holds the model, its own partition (``ClientData``) and what the server sent. The
local engine builds both in one process and shares one model between them; the Flower
apps build each in its own process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.client import LocalTraining
from fedlpp.algorithms.rotation import Rotation
from fedlpp.algorithms.rotation import describe as rotation_text
from fedlpp.algorithms.secure import NoiseShares, RotatedInput, RotatedMean, SecureEncoding, SecureInput, SecureMean, SumCombiner
from fedlpp.algorithms.spec import AlgorithmSpec, get_algorithm
from fedlpp.algorithms.steps import (
    ClientData,
    ClientRecipe,
    ClipToNorm,
    CompressedUpdateBytes,
    DeltaTransform,
    DpSgdTraining,
    Encoder,
    LocalTrainingPlan,
    SgdTraining,
    UpdateBytes,
)
from fedlpp.config import ConfigError, ExperimentConfig, SecAggConfig
from fedlpp.data import Example, TaskData, encode_for_classification, encode_for_generation, encode_prompts, load_task, partition
from fedlpp.data.partition import with_key
from fedlpp.engine.aggregation import Aggregation, CombinerFor, PlainAggregation, SecureAggregation
from fedlpp.evaluation.evaluate import Decoding, EvalSet
from fedlpp.models.backbone import Backbone, load_backbone
from fedlpp.models.lora import Adapter, PeftModel, adapter_shapes, attach_lora, initial_adapter
from fedlpp.models.machine import Machine, emulated_bf16, fp16_on_cpu, resolve_device
from fedlpp.privacy.client_dp import NoisedSum
from fedlpp.privacy.distributed import DistributedNoise
from fedlpp.privacy.plan import PrivacyPlan, distributed_plan, make_plan
from fedlpp.privacy.randomness import randomness
from fedlpp.quant import QuantSpec
from fedlpp.quant.stochastic import UplinkSpec
from fedlpp.secagg import SecAggParams, graph_degree
from fedlpp.secagg.params import threshold
from fedlpp.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSide:
    """The backbone with LoRA attached, as every party builds it from the config."""

    backbone: Backbone
    model: PeftModel
    kind: str  # generation | classification
    shapes: dict[str, tuple[int, ...]]
    load_peak_memory: int = 0  # bytes: this process's peak while it loaded the model (CUDA: its peak allocation; without
    # Linux's /proc/self/clear_refs, e.g. on macOS: the process's peak so far)

    @property
    def pad_id(self) -> int:
        return int(self.backbone.tokenizer.pad_token_id)

    @property
    def machine(self) -> Machine:
        return self.backbone.machine


@dataclass
class ServerContext:
    """What the server holds: config, model, algorithm, evaluation set and public counts."""

    cfg: ExperimentConfig
    task_name: str
    num_labels: int  # classification: the head's size (clients build the same model)
    side: ModelSide
    spec: AlgorithmSpec
    evalset: EvalSet
    decoding: Decoding
    a_seed: int  # seed of the LoRA A matrices (sent to clients by FFA variants)
    client_sizes: list[int]  # each client's number of examples (public: the DP rates and the SecAgg weight bound)
    privacy: PrivacyPlan | None = None  # set when privacy.mode is not none
    secure: SecureEncoding | None = None  # set when secagg.enabled: the server sees only sums
    verify_keys: dict[int, bytes] = dataclasses.field(default_factory=dict)  # secagg: each client's announced verify key
    uniform_weights: bool = False  # every client weighs 1 in the mean (fl.weighting), not the examples it claims

    @property
    def model(self) -> PeftModel:
        return self.side.model

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.side.shapes

    def trained(self, round_: int) -> list[str]:
        """The adapter tensors clients train and send in ``round_``."""
        return self.spec.trained_names(self.shapes, round_)

    def initial_adapter(self) -> Adapter:
        return initial_adapter(self.shapes, self.a_seed)

    @property
    def declared_sizes(self) -> dict[int, int]:
        """Client id -> its number of examples (its partition, or what its node declared on joining):
        no update may claim more. The server cannot check a client's data beyond that."""
        return dict(enumerate(self.client_sizes))

    @property
    def sigma(self) -> float:
        """The noise multiplier the clients are sent (the resumed run's, if it differs); 0 without DP."""
        return self.privacy.noise_multiplier if self.privacy is not None else 0.0


def algorithm_spec(cfg: ExperimentConfig) -> AlgorithmSpec:
    quant = QuantSpec(bits=cfg.quant.bits, granularity=cfg.quant.granularity, block_size=cfg.quant.block_size)
    uplink = UplinkSpec(cfg.uplink.bits, cfg.uplink.block_size) if cfg.uplink.bits < 32 else None
    return get_algorithm(cfg.algorithm.name, quant, cfg.algorithm.server_rule, cfg.algorithm.server_lr, uplink)


def load_task_data(cfg: ExperimentConfig, split: str = "dev") -> TaskData:
    """The task's data; ``split="test"`` evaluates on its test split instead (``fedlpp eval --split test``)."""
    d = cfg.data
    return load_task(
        d.task,
        path=d.path,
        hf_id=d.hf_id,
        num_train=d.num_train,
        num_eval=d.num_eval,
        seed=cfg.seed,
        eval_path=d.eval_path,
        split=split,
    )


def client_partitions(cfg: ExperimentConfig, task: TaskData) -> list[list[Example]]:
    """Each simulated client's training examples (the config's partition of the task)."""
    examples = with_key(task.train, cfg.data.key) if cfg.data.key else list(task.train)
    parts = partition(cfg.data.partition, examples, cfg.fl.num_clients, alpha=cfg.data.alpha, seed=cfg.seed)
    return [[task.train[i] for i in part] for part in parts]


def machine_of(cfg: ExperimentConfig) -> Machine:
    """Where this party's model runs and in what precision; a device this machine lacks is refused here."""
    return Machine(resolve_device(cfg.train.device), cfg.train.precision, cfg.model.quantize, cfg.train.gradient_checkpointing)


def build_model(cfg: ExperimentConfig, kind: str, num_labels: int) -> ModelSide:
    machine = machine_of(cfg)
    warn_of_slow_precision(machine)
    machine.reset_peak_memory()  # the load's own peak, also in a process that loaded a model before (a sweep, a test)
    backbone = load_backbone(cfg.model.name, kind, num_labels, cfg.model.pooling, machine)
    model = attach_lora(backbone, kind, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    return ModelSide(backbone, model, kind, adapter_shapes(model), machine.peak_memory()["bytes"])


def warn_of_slow_precision(machine: Machine) -> None:
    """A half precision this device runs many times slower than its other one: the run goes on, the log says so."""
    if gpu := emulated_bf16(machine):
        log.warning(
            "train.precision=bf16 on %s: this GPU has no native bf16, so torch emulates it and steps are slow; "
            "train.precision=fp16 is its native half precision (with DP-SGD, which refuses fp16: fp32)",
            gpu,
        )
    if fp16_on_cpu(machine):
        log.warning(
            "train.precision=fp16 on the CPU: torch's fp16 matmuls there are many times slower than fp32's on most "
            "CPUs; train.precision=bf16 is fast on CPUs with bf16 instructions (AVX512-BF16, AMX) (docs/scale.md)"
        )


def client_data(side: ModelSide, examples: Sequence[Example], client_id: int, max_length: int) -> ClientData:
    """A client's examples, tokenised for its model."""
    tok = side.backbone.tokenizer
    features: Sequence[dict]
    if side.kind == "classification":
        features = encode_for_classification(tok, examples, max_length)
    else:
        features = encode_for_generation(tok, examples, max_length)
    return ClientData(client_id, features, side.pad_id)


def build_evalset(task: TaskData, backbone: Backbone, max_length: int) -> EvalSet:
    tok = backbone.tokenizer
    if task.kind == "classification":
        return EvalSet("classification", tuple(encode_for_classification(tok, task.eval, max_length)))
    # Loaders set an eval example's target to its first reference: the loss is measured
    # against it, BLEU/ROUGE-L against all of them.
    features = encode_for_generation(tok, task.eval, max_length)
    prompts = encode_prompts(tok, task.eval, max_length)
    references = tuple(e.references or (e.target,) for e in task.eval)
    return EvalSet("generation", tuple(features), tuple(prompts), references, task.metric_names, task.multiline)


def check_privacy(cfg: ExperimentConfig, client_sizes: list[int]) -> PrivacyPlan | None:
    """The run's privacy plan (sigma calibrated), refused before any model loads when it cannot work. None without
    privacy, and under distributed DP, whose price depends on the updates' sizes: ``build_server`` plans it once,
    from the model's shapes, so its calibration errors come after the model load (and, deployed, after the nodes
    have joined)."""
    if not cfg.privacy.enabled or distributed_dp(cfg):
        return None
    plan = privacy_plan(cfg, client_sizes)
    if cfg.secagg.enabled and plan.mode == "client_dp" and cfg.secagg.modulus_bits == 32:
        check_noise_fits_range(cfg, plan)
    return plan


def eval_only(task: TaskData) -> TaskData:
    """The task without its training examples: what a server keeps of its own copy of the data."""
    return dataclasses.replace(task, train=())


def build_server(
    cfg: ExperimentConfig,
    task: TaskData,
    side: ModelSide,
    client_sizes: list[int],
    plan: PrivacyPlan | None,
    verify_keys: dict[int, bytes] | None = None,
    data_assigned: bool = True,
) -> ServerContext:
    """The server's side of a run; ``task`` supplies only its name and evaluation examples. ``data_assigned``: the
    server split the data itself (local engine, simulation), so the clients' example counts are its own; in a
    deployment they are what each node declared, and fl.weighting=auto weighs every client the same."""
    uniform = uniform_weighting(cfg, data_assigned)
    spec = algorithm_spec(cfg)
    if distributed_dp(cfg):
        plan = distributed_plan(
            cfg.privacy, distributed_noise(cfg, side.shapes, spec), participation(cfg), cfg.fl.clients_per_round
        )
    return ServerContext(
        cfg=cfg,
        task_name=task.name,
        num_labels=task.num_labels,
        side=side,
        spec=spec,
        evalset=build_evalset(task, side.backbone, cfg.model.max_length),
        decoding=Decoding.of(cfg.eval),
        a_seed=derive_seed(cfg.seed, "lora_a") % (2**31),
        client_sizes=list(client_sizes),
        privacy=plan,
        secure=secure_encoding(cfg, client_sizes, uniform) if cfg.secagg.enabled else None,
        verify_keys=dict(verify_keys or {}),
        uniform_weights=uniform,
    )


def uniform_weighting(cfg: ExperimentConfig, data_assigned: bool) -> bool:
    """fl.weighting resolved: auto is uniform where the clients' counts are only what they declare, and in a
    SecAgg field of fewer than 32 bits (which carries no counts)."""
    small_field = cfg.secagg.enabled and cfg.secagg.modulus_bits < 32
    return cfg.fl.weighting == "uniform" or (cfg.fl.weighting == "auto" and (not data_assigned or small_field))


def update_sizes(shapes: Mapping[str, tuple[int, ...]], spec: AlgorithmSpec) -> tuple[int, ...]:
    """Every number of values an update can have (RoLoRA's rounds train A or B: two sizes; the others one)."""
    return tuple(sorted({sum(math.prod(shapes[n]) for n in spec.trained_names(shapes, r)) for r in (1, 2)}))


def distributed_noise(cfg: ExperimentConfig, shapes: Mapping[str, tuple[int, ...]], spec: AlgorithmSpec) -> DistributedNoise:
    """What prices a round of distributed DP: the field, the clients, the clip, every update size the rounds send,
    and the fewest survivors the protocol can unmask (each needs its threshold of surviving neighbours)."""
    params = protocol_params(cfg)
    k = cfg.fl.clients_per_round
    return DistributedNoise(cfg.secagg.modulus_bits, k, cfg.privacy.clip_norm, update_sizes(shapes, spec), params.min_survivors)


def secure_encoding(cfg: ExperimentConfig, client_sizes: Sequence[int], uniform: bool = False) -> SecureEncoding:
    """What both ends of SecAgg agree on; refused when the fixed point cannot carry a client's weight.

    Under uniform weighting every input weighs 1 and the weight bound is 1, so the server checks after unmasking
    that the weights add up to exactly the number of survivors: no node can weigh more than one.
    """
    if cfg.secagg.modulus_bits < 32:
        return SecureEncoding(protocol_params(cfg), 1, rotation(cfg, rotation_seed(cfg)))
    # Each input carries its weight (the client's number of examples; 1 under client-level DP) as a
    # coordinate that must encode within clip_range * 2^scale_bits: beyond it every client drops out.
    weight = 1 if cfg.privacy.mode == "client_dp" or uniform else max(client_sizes)
    capacity = cfg.secagg.clip_range * 2.0**cfg.secagg.scale_bits
    if weight > capacity:
        raise ConfigError(
            f"secagg.clip_range: {cfg.secagg.clip_range:g} x 2^{cfg.secagg.scale_bits} (secagg.scale_bits) = "
            f"{capacity:g} cannot carry a client's weight of {weight} in SecAgg's fixed point, so every round "
            "would abort; raise secagg.clip_range or secagg.scale_bits"
        )
    # max_clients: the config requires >= 3 per round (secagg's MIN_CLIENTS)
    return SecureEncoding(protocol_params(cfg), 1 if uniform else max(client_sizes))


def protocol_params(cfg: ExperimentConfig) -> SecAggParams:
    """The run's SecAgg parameters, the same at the server and every client: no sum may hold fewer inputs than
    secagg.min_survivors asks, and under distributed DP than the accounting assumes (at least the threshold's
    floor: a sparse graph's is far below its clients)."""
    k = cfg.fl.clients_per_round
    params = secagg_params(cfg.secagg, k)
    floor = math.ceil(cfg.secagg.min_survivors * k - 1e-9)
    if distributed_dp(cfg):
        floor = max(floor, fewest_survivors(params, k))
    return dataclasses.replace(params, min_survivors=floor) if floor else params


def distributed_dp(cfg: ExperimentConfig) -> bool:
    """Client-level DP under SecAgg in a small field: each client adds its own discrete Gaussian share."""
    return cfg.privacy.mode == "client_dp" and cfg.secagg.enabled and cfg.secagg.modulus_bits < 32


def fewest_noise_shares(cfg: ExperimentConfig) -> int:
    """Under client-level DP with SecAgg, the fewest clients' noise shares a round's sum may hold: the protocol's
    floor (secagg.min_survivors, or a survivor's threshold of neighbours plus itself)."""
    params = protocol_params(cfg)
    return max(params.min_survivors, fewest_survivors(params, cfg.fl.clients_per_round))


def fewest_survivors(params: SecAggParams, clients: int) -> int:
    """The fewest inputs a round's sum can hold and still be unmasked: a survivor's threshold of neighbours, and itself."""
    return min(clients, threshold(params, graph_degree(params, clients)) + 1)


def secagg_params(cfg: SecAggConfig, clients_per_round: int) -> SecAggParams:
    """The protocol's parameters: fixed point with headroom in Z_2^32, or in a smaller field the integers the
    rotation makes (scale 1, each within the field, the sum bounded by the rotation's scale)."""
    if cfg.modulus_bits == 32:
        scale, clip_range, wraps = 2.0**cfg.scale_bits, cfg.clip_range, False
    else:
        scale, clip_range, wraps = 1.0, float(1 << (cfg.modulus_bits - 1)), True
    return SecAggParams(
        scale=scale,
        clip_range=clip_range,
        max_clients=clients_per_round,
        threshold_fraction=cfg.threshold,
        graph=cfg.graph,
        prg=cfg.prg,
        modulus_bits=cfg.modulus_bits,
        sum_may_wrap=wraps,
    )


def rotation(cfg: ExperimentConfig, seed: int) -> Rotation:
    """The small field's rotation, with the public seed of its signs (the server's, sent with each round); under
    client-level DP its bound is privacy.clip_norm (and ``with_noise`` adds the round's noise multiplier)."""
    bound = cfg.privacy.clip_norm if cfg.privacy.mode == "client_dp" else cfg.secagg.l2_bound
    return Rotation(cfg.secagg.modulus_bits, cfg.fl.clients_per_round, bound, seed)


def with_noise(encoding: SecureEncoding, cfg: ExperimentConfig, sigma: float) -> SecureEncoding:
    """Under client-level DP in a small field, the encoding whose clients add shares of z = ``sigma``: the noise
    multiplier the server sends each round (a resumed run keeps its own), so both ends pick the same scale."""
    if encoding.rotation is None or not distributed_dp(cfg):
        return encoding
    return dataclasses.replace(encoding, rotation=dataclasses.replace(encoding.rotation, noise_multiplier=sigma))


def rotation_seed(cfg: ExperimentConfig) -> int:
    """From the OS CSPRNG with privacy.secure_noise, else from the run's seed (reproducible)."""
    return secrets.randbits(63) if cfg.privacy.secure_noise else derive_seed(cfg.seed, "secagg_rotation")


# --- the round's composable steps, chosen once from the config -------------------------------


def client_recipe(
    cfg: ExperimentConfig,
    side: ModelSide,
    spec: AlgorithmSpec,
    sigma: float,
    encoding: SecureEncoding | None,
    uniform_weight: bool = False,
) -> ClientRecipe:
    """What every client does with a broadcast; ``sigma`` is the server's current noise multiplier (DP only) and
    ``uniform_weight`` whether the server weighs every update the same (it says so in its train message)."""
    mode = cfg.privacy.mode
    opts = LocalTraining.of(cfg.train)
    training: LocalTrainingPlan = SgdTraining(cfg.fl.local_steps, cfg.train.batch_size, opts, cfg.seed, side.machine)
    if mode == "dp_sgd":
        training = DpSgdTraining(
            cfg.fl.local_steps,
            cfg.train.batch_size,
            opts,
            cfg.seed,
            sigma,
            cfg.privacy.clip_norm,
            cfg.privacy.secure_noise,
            side.machine,
        )
    transforms: tuple[DeltaTransform, ...] = (ClipToNorm(cfg.privacy.clip_norm),) if mode == "client_dp" else ()
    return ClientRecipe(side.kind, side.shapes, spec, training, transforms, encoder(cfg, spec, sigma, encoding), uniform_weight)


def encoder(cfg: ExperimentConfig, spec: AlgorithmSpec, sigma: float, encoding: SecureEncoding | None) -> Encoder:
    """What a client sends: SecAgg's input (in a small field rotated, with its noise share under client-level DP),
    or update bytes (float32, or b-bit with uplink.bits)."""
    if encoding is not None and encoding.rotation is not None:
        return RotatedInput(with_noise(encoding, cfg, sigma), cfg.seed, cfg.privacy.secure_noise)
    if encoding is not None:
        return SecureInput(encoding, noise_shares(cfg, sigma))
    if spec.uplink is not None:
        return CompressedUpdateBytes(spec.uplink, cfg.seed, cfg.privacy.secure_noise)
    return UpdateBytes()


def noise_shares(cfg: ExperimentConfig, sigma: float) -> NoiseShares | None:
    """Client-level DP under SecAgg: each client's share of the noise; None otherwise."""
    if cfg.privacy.mode != "client_dp":
        return None
    return NoiseShares(cfg.privacy.clip_norm, sigma, float(cfg.fl.clients_per_round))


def make_aggregation(ctx: ServerContext) -> Aggregation:
    """The server's pipeline for the run: through SecAgg's protocol, or on the update bytes themselves."""
    if ctx.secure is not None:
        field = with_noise(ctx.secure, ctx.cfg, ctx.sigma).rotation
        if field is not None:
            for dim in update_sizes(ctx.shapes, ctx.spec):
                log.info(rotation_text(field, dim))
        return SecureAggregation(ctx.spec, ctx.secure, secure_combiner(ctx), ctx.verify_keys, ctx.shapes)
    return PlainAggregation(ctx.spec, combiner_for(ctx))


def combiner_for(ctx: ServerContext) -> CombinerFor:
    """Each round's combiner: the example-weighted mean, or client-level DP's clipped and noised mean."""
    plan = ctx.privacy
    if plan is not None and plan.mode == "client_dp":
        return functools.partial(client_dp_mean, plan, ctx.cfg.seed, ctx.declared_sizes)
    return lambda round_: rnd.WeightedMean(ctx.declared_sizes, ctx.uniform_weights)


def client_dp_mean(plan: PrivacyPlan, seed: int, declared: dict[int, int], round_: int) -> rnd.ClientDpMean:
    """Client-level DP's combiner for ``round_``: its noise from the OS CSPRNG in secure mode, else from (seed, round)."""
    rng = randomness(plan.secure_noise, derive_seed(seed, "client_dp_noise", round_))
    return rnd.ClientDpMean(NoisedSum(plan.clip_norm, plan.noise_multiplier, plan.expected_clients, rng), declared)


def secure_combiner(ctx: ServerContext) -> SumCombiner:
    """SecAgg's combiner: the (DP-noised) mean from the protocol's sum, or in a small field the rotated one's."""
    if ctx.secure is None:
        raise ValueError("secure_combiner needs secagg.enabled")
    if ctx.secure.rotation is not None:
        return RotatedMean(with_noise(ctx.secure, ctx.cfg, ctx.sigma))
    return SecureMean(ctx.secure, noise_shares(ctx.cfg, ctx.sigma))


# --- privacy and sampling --------------------------------------------------------------------


def privacy_plan(cfg: ExperimentConfig, client_sizes: list[int]) -> PrivacyPlan:
    """Sigma for the whole run, calibrated against the rounds each client will really join."""
    fl = cfg.fl
    return make_plan(
        cfg.privacy, client_sizes, cfg.train.batch_size, fl.local_steps, participation(cfg), fl.rounds, fl.clients_per_round
    )


def participation(cfg: ExperimentConfig) -> dict[int, int]:
    """How many of the run's rounds each client is sampled for (K of N a round, from the seed)."""
    fl = cfg.fl
    count = dict.fromkeys(range(fl.num_clients), 0)
    for round_ in range(1, fl.rounds + 1):
        for c in sample_clients(cfg.seed, round_, fl.num_clients, fl.clients_per_round):
            count[c] += 1
    return count


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


def client_selection(cfg: ExperimentConfig) -> Callable[[int], list[int]]:
    """round -> its clients: K of N, or each with probability K/N under client-level DP's Poisson client sampling."""
    fl = cfg.fl
    if cfg.privacy.mode == "client_dp" and cfg.privacy.client_sampling == "poisson":
        return functools.partial(poisson_clients, cfg.privacy.secure_noise, cfg.seed, fl.num_clients, fl.clients_per_round)
    return functools.partial(sample_clients, cfg.seed, num_clients=fl.num_clients, k=fl.clients_per_round)


def round_clients(cfg: ExperimentConfig, round_: int) -> list[int]:
    """This round's clients (``client_selection`` of the config)."""
    return client_selection(cfg)(round_)


def poisson_clients(secure: bool, seed: int, num_clients: int, k: int, round_: int) -> list[int]:
    """Each client independently with probability K/N, from the OS CSPRNG in secure mode."""
    rng = randomness(secure, derive_seed(seed, "client_sampling", round_))
    return [int(c) for c in (rng.uniform(num_clients) < k / num_clients).nonzero()[0]]


def sample_clients(seed: int, round_: int, num_clients: int, k: int) -> list[int]:
    """The K clients of a round, without replacement; a pure function of (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, "clients", round_))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


# --- the local engine: both sides in one process ----------------------------------------------


@dataclass
class LocalRun:
    """The local engine's run: the server's side and every client's data, sharing one model."""

    server: ServerContext
    clients: list[ClientData]


def build_run(cfg: ExperimentConfig) -> LocalRun:
    """Data, then model, then algorithm — in that order, so data errors come before a model load."""
    task = load_task_data(cfg)
    parts = client_partitions(cfg, task)
    sizes = [len(p) for p in parts]
    plan = check_privacy(cfg, sizes)  # before the slow model load
    side = build_model(cfg, task.kind, task.num_labels)
    clients = [client_data(side, part, k, cfg.model.max_length) for k, part in enumerate(parts)]
    return LocalRun(build_server(cfg, eval_only(task), side, sizes, plan), clients)
