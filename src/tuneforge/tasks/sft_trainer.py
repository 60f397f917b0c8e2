"""The SFT trainer: TRL's SFTTrainer with the LM head and the per-token metrics decided by tuneforge.

TRL 1.16's SFTTrainer always patches the model with a fused, chunked LM head + loss that also computes each
token's entropy and whether it was the top-1 guess, on every micro-batch. The head exists to save GPU memory
(no (batch, length, vocab) logits); on a CPU it only costs: it scores every position (prompt and padding
included, its compaction runs on Triton devices only), re-computes the logits in the backward, and the
metrics are computed whether or not the step logs them. Here:

- `train.fused_lm_head` (auto: on with CUDA, off elsewhere; config/device.py has the figures) picks TRL's fused
  head or the model's own forward, with its LM head applied only at the positions whose next token is trained
  (transformers' `logits_to_keep` mask): the prompt's and the padding's logits, most of a row with a short
  answer (70 of the demo's 82 tokens), are never computed, in the forward or the backward. The loss is the one
  transformers' Trainer computes from the full logits (summed cross-entropy over the trained tokens, divided by
  their count in the accumulated batch); models whose forward cannot take the mask get the full logits;
- `train.token_metrics` (opt-in) logs `entropy` and `mean_token_accuracy`, computed only for the micro-batches
  of the optimizer steps that log (and for evaluation), so their cost is paid once per logged step.

Configurations that need TRL's own loss (loss_type=dft, label smoothing, an MoE aux loss, sequence parallelism)
keep TRL's compute_loss, with its fused head and per-step metrics.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.modeling_utils import slice_logits_to_keep
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

# The fused head's per-token extras that feed the two metrics.
METRIC_OUTPUTS = ("entropy", "is_top1")


class TuneforgeSFTTrainer(SFTTrainer):
    def __init__(self, *args, fused_lm_head: bool, token_metrics: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_lm_head, self.token_metrics = fused_lm_head, token_metrics
        a = self.args
        self.own_loss = (a.loss_type == "nll" and not a.label_smoothing_factor and not self.aux_loss_enabled
                         and self.compute_loss_func is None and self.accelerator.parallelism_config is None)
        if not self.own_loss:
            return
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.head_model = base
        self.trained_positions_only = takes_position_mask(base)
        # TRL's patch is an instance attribute: removing it restores the class's own forward.
        base.__dict__.pop("forward", None)
        self.fused_forwards = {}
        if fused_lm_head:
            # Two fused forwards, without and with the metric extras: a step that does not log does not pay them.
            for measured in (False, True):
                add_fused_lm_head(base, outputs=("log_probs", *METRIC_OUTPUTS) if measured else ("log_probs",))
                self.fused_forwards[measured] = base.__dict__.pop("forward")
            base.forward = self.fused_forwards[False]

    def logs_this_step(self) -> bool:
        """Whether the optimizer step this micro-batch belongs to logs (transformers' DefaultFlowCallback rule)."""
        step, args = self.state.global_step + 1, self.args
        if step == 1 and args.logging_first_step:
            return True
        return args.logging_strategy == "steps" and bool(self.state.logging_steps) and step % self.state.logging_steps == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.own_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        measure = self.token_metrics and (mode == "eval" or self.logs_this_step())
        inputs["use_cache"] = False
        if self.fused_lm_head:
            self.head_model.forward = self.fused_forwards[measure]
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if measure:
                self._log_token_metrics(mode, outputs.label_mask.sum(), outputs.entropy.detach().sum(),
                                        outputs.is_top1.sum())
        elif self.trained_positions_only and not return_outputs:
            loss, logits, targets = self._trained_positions_loss(model, inputs, num_items_in_batch)
            if measure:
                self._log_token_metrics(mode, *token_statistics(logits, targets))
        else:
            # The model's own loss over the full logits, as transformers' Trainer computes it (and the logits a
            # caller of return_outputs expects, shaped (batch, length, vocab)).
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if measure:
                labels = inputs["labels"][:, 1:].to(outputs.logits.device)
                self._log_token_metrics(mode, *token_statistics(outputs.logits[:, :-1][labels != -100],
                                                                labels[labels != -100]))
        self._count_tokens(mode, inputs)
        if return_outputs:
            if self.fused_lm_head:
                with torch.no_grad():  # the logits that compute_metrics asks for (the fused head builds none)
                    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _trained_positions_loss(self, model, inputs, num_items_in_batch):
        """(loss, the logits of the trained positions, their targets): the model's forward with its LM head applied
        only where the next token is trained. The sum over tokens divided by the accumulated batch's trained-token
        count is transformers' causal-LM loss exactly (upcast to fp32, the same shift: position p predicts p + 1)."""
        labels = inputs["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        targets = labels[:, 1:][keep[:, :-1]]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
        logits = outputs.logits.float()
        loss = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
        if num_items_in_batch is None:
            loss = loss / max(targets.numel(), 1)
        else:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss, logits, targets

    def _log_token_metrics(self, mode: str, valid, entropy_sum, correct) -> None:
        gather = self.accelerator.gather_for_metrics
        valid, entropy_sum, correct = gather(valid).sum(), gather(entropy_sum).sum(), gather(correct).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)

    def _count_tokens(self, mode: str, inputs) -> None:
        """TRL's `num_tokens` log entry (tokens processed so far, padding excluded), as its compute_loss keeps it."""
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def takes_position_mask(model) -> bool:
    """Whether the model's forward slices its hidden states with transformers' shared helper, the one that takes a
    (batch, length) boolean `logits_to_keep` (257 of transformers 5's 260 models that take the argument)."""
    module = inspect.getmodule(type(model).forward)
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters and \
        getattr(module, "slice_logits_to_keep", None) is slice_logits_to_keep


@torch.no_grad()
def token_statistics(logits, targets):
    """(valid tokens, summed entropy, correct top-1 guesses) of next-token predictions at the trained positions:
    logits (tokens, vocab) and their targets (tokens,)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    correct = log_p.argmax(-1) == targets.to(logits.device)
    return torch.tensor(targets.numel(), device=logits.device), entropy.sum(), correct.sum()
