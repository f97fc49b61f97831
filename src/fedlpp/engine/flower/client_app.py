"""The ClientApp: a node answers who it is, and trains with ``client_step`` on its own data.

A node's data is its own: a JSONL file named by ``data-path`` in its node config (a real
deployment; ``client-id`` optionally fixes its index), or, on Flower's simulation runtime,
partition ``partition-id`` of the experiment's task, cut exactly as the local engine cuts
it. The model is built once per process and shared by the virtual clients a process
serves (only the adapter is swapped); partitions are tokenised when first used and only
the most recent few are kept, so memory does not grow with the number of clients.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlpp.algorithms.steps import ClientData, client_step
from fedlpp.config import ExperimentConfig, build_config
from fedlpp.data import Example
from fedlpp.data.examples_file import read_examples
from fedlpp.engine.flower import secure
from fedlpp.engine.flower.messages import QUERY, TRAIN, MessageError, content, fields_of, require
from fedlpp.engine.flower.node_policy import NodePolicy
from fedlpp.engine.flower.roster import UNASSIGNED
from fedlpp.engine.setup import (
    ModelSide,
    algorithm_spec,
    build_model,
    client_data,
    client_partitions,
    client_recipe,
    load_task_data,
)

DATA_PATH, CLIENT_ID = "data-path", "client-id"  # node config keys of a deployed SuperNode
PARTITION_ID = "partition-id"  # set by Flower's simulation runtime
CACHED_PARTITIONS = 8  # tokenised partitions kept per process

log = logging.getLogger(__name__)

app = ClientApp()


@dataclass(frozen=True)
class DataSource:
    """Where this node's examples come from: its own file, or its simulated partition.

    A file is known by its path and its (modification time, size): a warm node that serves
    several runs reads it again when it has changed.
    """

    client_id: int
    path: str = ""  # a deployed node's JSONL file
    stamp: tuple[int, int] = (0, 0)

    @staticmethod
    def of(node_config: Mapping[str, object]) -> DataSource:
        if DATA_PATH in node_config:
            client_id = node_config.get(CLIENT_ID, UNASSIGNED)
            if not isinstance(client_id, int) or isinstance(client_id, bool) or client_id < UNASSIGNED:
                raise MessageError(f"node config {CLIENT_ID}: expected a non-negative integer, got {client_id!r}")
            path = str(node_config[DATA_PATH])
            try:
                info = os.stat(path)
                stamp = (info.st_mtime_ns, info.st_size)
            except OSError:
                stamp = (0, 0)  # read_examples says what is wrong
            return DataSource(client_id, path, stamp)
        if PARTITION_ID in node_config:
            return DataSource(int(node_config[PARTITION_ID]))  # type: ignore[call-overload]
        raise MessageError(
            f"this node has no {DATA_PATH!r} in its node config: start it with --node-config \"{DATA_PATH}='...'\""
        )

    def examples(self, cfg: ExperimentConfig) -> list[Example]:
        if self.path:
            return read_examples(self.path)
        return simulated_partitions(cfg)[self.client_id]


def simulated_clients_on_the_cpu(cfg: ExperimentConfig) -> bool:
    """train.device=auto with flower.client_gpus=0: Ray gives a simulated client no GPU, so it runs on the CPU."""
    return cfg.train.device == "auto" and cfg.flower.client_gpus == 0


def config_of(fields: Mapping[str, object], node_config: Mapping[str, object]) -> ExperimentConfig:
    """The run's config as this node applies it: a simulated client that Ray gives no GPU runs on the CPU
    (``simulated_clients_on_the_cpu``); a deployed node's auto picks its own machine's device."""
    cfg = build_config(tomllib.loads(require(fields, "config", str)))
    simulated = PARTITION_ID in node_config and DATA_PATH not in node_config
    if simulated and simulated_clients_on_the_cpu(cfg):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    return cfg


@functools.lru_cache(maxsize=2)
def simulated_partitions(cfg: ExperimentConfig) -> list[list[Example]]:
    """Every client's examples under the config's partition (simulation only: one copy per process)."""
    return client_partitions(cfg, load_task_data(cfg))


@dataclass
class HeldModel:
    """The one model this process holds, what it was built for (config, kind, labels), and how many it has built."""

    key: tuple[ExperimentConfig, str, int] | None = None
    side: ModelSide | None = None
    loads: int = 0


HELD = HeldModel()


def model_side(cfg: ExperimentConfig, kind: str, num_labels: int) -> ModelSide:
    """The model for a config, built on first use and kept while messages carry the same config.

    A new config drops the old model first (and the data tokenised for it): two backbones
    never sit in memory at once.
    """
    key = (cfg, kind, num_labels)
    if HELD.key != key:
        HELD.key, HELD.side = None, None
        own_data.cache_clear()
        HELD.loads += 1
        log.info("model load %d in this process: %s (%s)", HELD.loads, cfg.model.name, kind)
        HELD.side, HELD.key = build_model(cfg, kind, num_labels), key
    assert HELD.side is not None
    return HELD.side


@functools.lru_cache(maxsize=CACHED_PARTITIONS)
def own_data(cfg: ExperimentConfig, kind: str, num_labels: int, source: DataSource, client_id: int) -> ClientData:
    return client_data(model_side(cfg, kind, num_labels), source.examples(cfg), client_id, cfg.model.max_length)


class PlainReplies:
    """A node's side of plain aggregation: its update bytes go to the server as they are."""

    def identify(self, state: RecordDict) -> dict[str, object]:
        return {}

    def encoding(self, cfg: ExperimentConfig, fields: Mapping[str, object]) -> None:
        return None

    def reply(
        self, state: RecordDict, cfg: ExperimentConfig, fields: Mapping[str, object], client_id: int, upload: object
    ) -> dict[str, object]:
        return {"upload": upload}


def replies_for(cfg: ExperimentConfig) -> PlainReplies | secure.SecureReplies:
    """How this node answers, chosen once from the config: plain updates, or SecAgg's advertisement and steps."""
    return secure.SecureReplies() if cfg.secagg.enabled else PlainReplies()


def check_own_privacy(source: DataSource, cfg: ExperimentConfig) -> None:
    """A deployed node adds DP-SGD noise only from its own CSPRNG: the run's seed is the server's."""
    if source.path and cfg.privacy.mode == "dp_sgd" and not cfg.privacy.secure_noise:
        raise MessageError(
            "privacy.secure_noise=false: this node's DP-SGD noise would follow from the server's seed, so "
            "the server could remove it; a deployed node trains under DP only with privacy.secure_noise=true"
        )


@app.query()
def query(message: Message, context: Context) -> Message:
    """Who this node is: its client id (or -1), how many examples it holds (and its SecAgg verify key)."""
    cfg = config_of(fields_of(message), context.node_config)
    source = DataSource.of(context.node_config)
    check_own_privacy(source, cfg)
    answer = {
        "client_id": source.client_id,
        "num_examples": len(source.examples(cfg)),
        **replies_for(cfg).identify(context.state),
    }
    return Message(content(kind=QUERY, **answer), reply_to=message)


def prepare(message: Message, context: Context) -> None:
    """After a query is answered (a warm node): build the model and tokenise this node's data before the first round."""
    if message.metadata.message_type != QUERY:
        return
    fields = fields_of(message)
    kind, num_labels = fields.get("kind"), fields.get("num_labels")
    if not isinstance(kind, str) or not kind or not isinstance(num_labels, int):
        return  # a server that does not name the task: the first train message builds them
    cfg, source = config_of(fields, context.node_config), DataSource.of(context.node_config)
    if source.client_id == UNASSIGNED:  # the server gives it an id: the data is tokenised for that id at round 1
        model_side(cfg, kind, num_labels)
    else:
        data = own_data(cfg, kind, num_labels, source, source.client_id)
        if cfg.privacy.mode != "dp_sgd":  # DP-SGD's per-example hooks must see only its own steps
            warm_up_training(model_side(cfg, kind, num_labels), data, cfg)


def warm_up_training(side: ModelSide, data: ClientData, cfg: ExperimentConfig) -> None:
    """One forward and backward on a batch of this node's data, gradients dropped: a process's first training step pays
    one-off costs (measured: 3-4 s on SmolLM2-135M) that would otherwise land in the first round this node trains.

    No optimizer step and the adapter untouched; the global random generators are left as they were (every client step
    seeds its own dropout anyway)."""
    from fedlpp.algorithms.client import forked_rng, shuffled_batches
    from fedlpp.engine.setup import machine_of
    from fedlpp.models.objective import example_losses

    batch = next(shuffled_batches(data.features, 1, cfg.train.batch_size, data.pad_id, seed=0))
    model, machine = side.model, machine_of(cfg)
    model.train()
    try:
        with forked_rng(machine), machine.autocast():
            loss = example_losses(model, batch, side.kind).sum()
            if loss.requires_grad:
                loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round: the broadcast in, this client's update out (``client_step``); under SecAgg its advertisement."""
    fields = fields_of(message)
    cfg = config_of(fields, context.node_config)
    kind, num_labels = require(fields, "kind", str), require(fields, "num_labels", int)
    client_id, sigma = require(fields, "client_id", int), require(fields, "sigma", float)
    source = DataSource.of(context.node_config)
    check_own_privacy(source, cfg)
    registry = fields.get("registry")  # under SecAgg: the round's participants
    participants = len(secure.registry_from_text(registry)) if isinstance(registry, str) else None
    policy = NodePolicy.of(context.node_config)
    policy.check(cfg, sigma, participants)  # the privacy this node requires, whatever the server asks
    replies = replies_for(cfg)
    side = model_side(cfg, kind, num_labels)
    data = own_data(cfg, kind, num_labels, source, client_id)
    policy.spend(context.state, cfg, sigma, data.num_examples)
    uniform = fields.get("weighting") == "uniform"  # the server weighs every update the same: this one weighs 1
    recipe = client_recipe(cfg, side, algorithm_spec(cfg), sigma, replies.encoding(cfg, fields), uniform)
    out = client_step(side.model, require(fields, "payload", bytes), data, recipe)
    if out.round_ != require(fields, "round", int):  # the round the server says must be the broadcast's own
        raise MessageError(f"the message says round {fields['round']} but its broadcast is for round {out.round_}")
    loss = math.nan if out.loss is None else out.loss
    answer = replies.reply(context.state, cfg, fields, client_id, out.upload)
    return Message(
        content(kind=TRAIN, num_examples=out.num_examples, loss=loss, peak_memory=out.peak_memory, **answer), reply_to=message
    )


@app.train(secure.ACTION)
def secagg(message: Message, context: Context) -> Message:
    """One step of the SecAgg protocol with the session this node keeps in its own state."""
    return Message(content(kind=secure.ACTION, message=secure.next_step(context.state, fields_of(message))), reply_to=message)
