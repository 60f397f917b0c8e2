"""The SFT trainer: TRL's SFTTrainer with the LM head and the per-token metrics decided by tuneforge.

TRL 1.16's SFTTrainer always patches the model with a fused, chunked LM head + loss that also computes each
token's entropy and whether it was the top-1 guess, on every micro-batch. The head exists to save GPU memory
(no (batch, length, vocab) logits); on a CPU it only costs: it scores every position (prompt and padding
included, its compaction runs on Triton devices only), re-computes the logits in the backward, and the
metrics are computed whether or not the step logs them. Here:

- `train.fused_lm_head` (auto: on with CUDA, off elsewhere; config/device.py has the figures) picks TRL's fused
  head or the model's own forward and loss, the one transformers' Trainer uses;
- `train.token_metrics` (opt-in) logs `entropy` and `mean_token_accuracy`, computed only for the micro-batches
  of the optimizer steps that log (and for evaluation), so their cost is paid once per logged step.

Configurations that need TRL's own loss (loss_type=dft, label smoothing, an MoE aux loss, sequence parallelism)
keep TRL's compute_loss, with its fused head and per-step metrics.
"""

from __future__ import annotations

import torch
from transformers import Trainer
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
        else:
            # The model's own loss over the full logits, as transformers' Trainer computes it.
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if measure:
                self._log_token_metrics(mode, *token_statistics(outputs.logits, inputs["labels"]))
        self._count_tokens(mode, inputs)
        if return_outputs:
            if self.fused_lm_head:
                with torch.no_grad():  # the logits that compute_metrics asks for (the fused head builds none)
                    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

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


@torch.no_grad()
def token_statistics(logits, labels):
    """(valid tokens, summed entropy, correct top-1 guesses) of next-token predictions where the label is trained."""
    logits, labels = logits[:, :-1], labels[:, 1:].to(logits.device)
    mask = labels != -100
    picked = logits[mask].float()
    log_p = torch.log_softmax(picked, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    correct = picked.argmax(-1) == labels[mask]
    return mask.sum(), entropy.sum(), correct.sum()
