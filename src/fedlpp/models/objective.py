"""Per-example losses: one number per sequence, so one example's weight never depends on the others.

Generation: mean token cross-entropy over the completion tokens of each sequence (labels
are -100 on prompt and padding). Classification: cross-entropy of each example. Summing
or averaging these per-example values is what DP-SGD needs too (DESIGN 3.1).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from fedlpp.models.machine import model_device

IGNORE = -100


def example_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
    """[B] losses for a collated batch (input_ids, attention_mask, labels)."""
    head = fused_head(model) if kind == "generation" else None
    if head is not None:
        return head.losses(batch)
    logits, labels = forward_logits(model, batch, kind)
    return losses_from_logits(logits, labels, kind)


@functools.cache
def fused_head_models() -> dict[type, bool]:
    """Causal LMs whose forward is exactly ``logits = lm_head(decoder(inputs).last_hidden_state[kept])``, then for
    the soft-capped ones (True) ``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping`` (transformers
    5's modeling code), so the head can run here, fused with the loss. The classes themselves, not their names or
    subclasses: a subclass may change its forward."""
    import transformers

    plain = ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Gemma", "Olmo2", "SmolLM3")
    soft_capped = ("Gemma2", "Gemma3")
    return {getattr(transformers, f"{name}ForCausalLM"): name in soft_capped for name in plain + soft_capped}


@dataclass(frozen=True)
class FusedHead:
    """A causal LM's decoder and frozen LM head, whose loss ``HeadCrossEntropy`` computes without whole logits."""

    decoder: nn.Module
    head: nn.Linear
    softcap: float | None  # logits = softcap * tanh(head(h) / softcap) when set

    def losses(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B] mean completion-token cross-entropies.

        Only the hidden states of positions whose next token is scored go through the head: the prompt and
        padding carry no loss.
        """
        device = self.head.weight.device
        labels = batch["labels"].to(device)
        inputs, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = self.decoder(input_ids=inputs, attention_mask=mask, use_cache=False)  # nothing is generated
        states = hidden.last_hidden_state
        targets = next_token_targets(labels)
        scored = (targets != IGNORE).reshape(-1).nonzero().squeeze(1)
        rows = max(1, CE_CHUNK // self.head.out_features)
        scored_states = states.reshape(-1, states.shape[-1]).index_select(0, scored)
        wanted = targets.reshape(-1).index_select(0, scored)
        with_grad = torch.is_grad_enabled() and scored_states.requires_grad
        token_loss = HeadCrossEntropy.apply(scored_states, self.head.weight, wanted, rows, with_grad, self.softcap)
        per_token = torch.zeros(targets.numel(), dtype=torch.float32, device=device).index_put((scored,), token_loss)
        return mean_over_scored(per_token.view(targets.shape), targets)


def fused_head(model: nn.Module) -> FusedHead | None:
    """The decoder and head of a causal LM of ``fused_head_models`` (peft-wrapped or not); None for any other.

    The fused loss uses the head's weight, not its module: hooks on the head do not run."""
    get_base_model = getattr(model, "get_base_model", None)
    base: Any = get_base_model() if get_base_model is not None else model
    soft_capped = fused_head_models().get(type(base))
    if soft_capped is None:
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None  # a 4-bit, LoRA-wrapped, biased or trained head: the model's own forward
    softcap = getattr(base.config, "final_logit_softcapping", None) if soft_capped else None
    return FusedHead(base.get_decoder(), head, None if softcap is None else float(softcap))


class HeadCrossEntropy(torch.autograd.Function):
    """[N] float32 cross-entropies of the logits ``states @ weight.T`` (soft-capped: ``cap * tanh(. / cap)``) for
    ``targets`` (none of them IGNORE), computed ``rows`` rows at a time, each row's gradient with respect to its
    state taken in the same pass.

    The loss of a row depends on its own state only, so its gradient is (softmax - one-hot) @ weight (times the
    cap's derivative 1 - tanh^2 before the product), known in the forward pass; backward scales it by the row's
    incoming gradient. Neither the [N, V] logits nor their gradient is ever whole (at a 128k vocabulary and 512
    tokens each is 131 MB in bf16, 263 MB in fp32), and nothing is recomputed: the head's two products per row
    are the forward and the gradient, as in autograd. The frozen weight gets no gradient. Products run in the
    ambient autocast dtype, the cap and the softmax in float32, in place on one float32 [rows, V] buffer (a
    second one under a soft-cap), so a chunk's transients are that buffer and, in bf16, the product's own copy.
    """

    @staticmethod
    def forward(
        ctx: Any,
        states: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
        with_grad: bool,
        softcap: float | None,
    ) -> torch.Tensor:
        losses = torch.empty(len(states), dtype=torch.float32, device=states.device)
        grads = torch.empty(states.shape, dtype=torch.float32, device=states.device) if with_grad else None
        for i in range(0, len(states), rows):
            loss, grad = _head_rows(states[i : i + rows], weight, targets[i : i + rows, None], softcap, with_grad)
            losses[i : i + rows] = loss
            if grads is not None and grad is not None:
                grads[i : i + rows] = grad
        ctx.save_for_backward(grads)
        ctx.states_dtype = states.dtype
        return losses

    @staticmethod
    @once_differentiable  # the saved gradients are constants: a second derivative would be silently wrong
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        (grads,) = ctx.saved_tensors
        if grads is None:
            return None, None, None, None, None, None
        return (grad_losses[:, None] * grads).to(ctx.states_dtype), None, None, None, None, None


def _head_rows(
    part: torch.Tensor, weight: torch.Tensor, wanted: torch.Tensor, softcap: float | None, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of ``HeadCrossEntropy``: the rows' losses and, with ``with_grad``, their gradients with respect to
    ``part``. The log-softmax is z - max - log(sum(exp(z - max))), taken in place; its buffers die on return."""
    logits = F.linear(part, weight).float()  # in bf16 the product's own copy is freed here
    capped = None
    if softcap is not None:
        capped = logits.div_(softcap).tanh_()
        logits = capped * softcap
    logits.sub_(logits.amax(1, keepdim=True))
    picked = logits.gather(1, wanted).squeeze(1)
    probs = logits.exp_()
    total = probs.sum(1)
    losses = total.log() - picked
    if not with_grad:
        return losses, None
    minus_one = torch.full(wanted.shape, -1.0, dtype=probs.dtype, device=wanted.device)
    softmax_minus_onehot = probs.div_(total[:, None]).scatter_add_(1, wanted, minus_one)
    if capped is not None:  # d(cap tanh(z / cap)) / dz = 1 - tanh^2
        softmax_minus_onehot.mul_(capped.square_().neg_().add_(1.0))
    return losses, softmax_minus_onehot.to(weight.dtype) @ weight


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the labels aligned with them.

    For causal LMs only the positions from the earliest completion token on are projected
    onto the vocabulary (``logits_to_keep``): prompt positions carry no loss, and the LM
    head over a 49k vocabulary is most of a small model's cost.
    """
    device = model_device(model)  # batches are collated on the CPU; the model may be elsewhere
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    labels = batch["labels"].to(device)
    keep = _positions_to_keep(labels) if kind == "generation" and _accepts_logits_to_keep(model) else 0
    if keep:
        inputs["logits_to_keep"] = keep
        labels = labels[:, -keep:]
    return model(**inputs).logits, labels


def _positions_to_keep(labels: torch.Tensor) -> int:
    scored = (labels != IGNORE).any(0).nonzero()
    if len(scored) == 0:
        return 0
    # Position t predicts label t+1, so keep one position before the first scored label.
    return int(labels.shape[1] - max(int(scored[0]) - 1, 0))


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    get_base_model = getattr(model, "get_base_model", None)  # a peft model: the transformers model inside
    base: Any = get_base_model() if get_base_model is not None else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def losses_from_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """[B] losses from logits ([B, C] or [B, T, V]) and labels ([B] or [B, T])."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")  # logits [B, C]
    targets = next_token_targets(labels)
    token_loss = token_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
    return mean_over_scored(token_loss, targets)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] what each position of a causal LM is scored against: position t predicts token t+1, the last nothing."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


def mean_over_scored(token_loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] each sequence's mean token loss over its scored positions (0 where none is scored)."""
    mask = (targets != IGNORE).float()
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)


CE_CHUNK = 2**24  # logits per cross-entropy chunk (64 MB in float32; a fused chunk's transients about twice that)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] float32 cross-entropies of [N, V] logits (any dtype), IGNORE targets giving 0, in chunks of rows.

    Each chunk is upcast to float32 for the softmax and, when gradients are needed, checkpointed: only
    the logits themselves are kept for backward, not a float32 log-softmax of them (at a 128k
    vocabulary that copy is the largest tensor of a LoRA step: DESIGN 5.1, bench/scale.py).
    """
    rows = max(1, CE_CHUNK // max(1, logits.shape[-1]))
    if len(logits) <= rows:
        return _cross_entropy_rows(logits, targets)
    keep_for_backward = logits.requires_grad and torch.is_grad_enabled()  # evaluation: chunks alone bound the copies

    def chunk(i: int) -> torch.Tensor:
        part, wanted = logits[i : i + rows], targets[i : i + rows]
        if keep_for_backward:
            return checkpoint(_cross_entropy_rows, part, wanted, use_reentrant=False)
        return _cross_entropy_rows(part, wanted)

    return torch.cat([chunk(i) for i in range(0, len(logits), rows)])


def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
