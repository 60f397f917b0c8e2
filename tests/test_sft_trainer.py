"""tasks/sft_trainer.py: the LM head tuneforge picks (train.fused_lm_head) trains like TRL's fused one, and the
token metrics (train.token_metrics) are opt-in and computed for the logged steps only."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tuneforge.tasks import sft_trainer
from tuneforge.tasks.sft_trainer import TuneforgeSFTTrainer

VOCAB = 64
METRICS = ("entropy", "mean_token_accuracy")


def _tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                  pad_token="t0", eos_token="t2", unk_token="t1")
    return tok


def _rows(n=16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (6 + i % 5,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return Dataset.from_list(rows)


def _trainer(tmp_path, fused: bool, metrics: bool, max_steps=4, logging_steps=2):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                     logging_steps=logging_steps, report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2,
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, disable_tqdm=True)
    return TuneforgeSFTTrainer(model=model, args=args, train_dataset=_rows(), processing_class=_tokenizer(),
                               data_collator=DataCollatorForLanguageModeling(pad_token_id=0),
                               fused_lm_head=fused, token_metrics=metrics)


def _logged(trainer, key):
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


@pytest.mark.parametrize("fused", [False, True])
def test_token_metrics_are_off_unless_asked(tmp_path, fused):
    trainer = _trainer(tmp_path, fused, metrics=False)
    trainer.train()
    assert set(_logged(trainer, "loss")) == {2, 4}
    assert all(not _logged(trainer, key) for key in METRICS)


def test_both_heads_train_alike_and_measure_the_logged_steps_only(tmp_path, monkeypatch):
    """The model's own loss (the CPU default) and TRL's fused head give the same losses and metrics; logging every
    3rd of 6 steps, the metrics are computed for those 2 micro-batches, not for all 6."""
    measured = []
    original = TuneforgeSFTTrainer._log_token_metrics
    monkeypatch.setattr(TuneforgeSFTTrainer, "_log_token_metrics",
                        lambda self, *a: (measured.append(self.state.global_step + 1), original(self, *a))[1])
    from_logits = []
    stats = sft_trainer.token_statistics
    monkeypatch.setattr(sft_trainer, "token_statistics", lambda *a: (from_logits.append(1), stats(*a))[1])
    runs = {}
    for fused in (False, True):
        measured.clear()
        trainer = _trainer(tmp_path / str(fused), fused, metrics=True, max_steps=6, logging_steps=3)
        # Without the fused head, TRL's patched forward is gone: the model's class forward runs.
        assert ("forward" in trainer.model.get_base_model().__dict__) is fused
        trainer.train()
        assert measured == [3, 6]
        runs[fused] = trainer
    assert len(from_logits) == 2  # the fused head computes them in its own pass, and only when asked
    for key in ("loss", *METRICS):
        native, fused = _logged(runs[False], key), _logged(runs[True], key)
        assert set(native) == set(fused) == {3, 6}
        for step in native:
            assert native[step] == pytest.approx(fused[step], rel=1e-4, abs=1e-6), (key, step)


def test_generation_is_unchanged_by_the_fused_head(tmp_path):
    trainer = _trainer(tmp_path, fused=True, metrics=False)
    model = trainer.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    plain = _trainer(tmp_path / "plain", fused=False, metrics=False).model.eval()
    assert torch.equal(out, plain.generate(input_ids=ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("accumulated", [None, 23])
def test_the_head_scores_only_trained_positions_and_the_loss_and_gradients_are_the_models_own(tmp_path, accumulated):
    """A batch with prompt tokens, padding, a row without any trained token: the LM head sees exactly the positions
    whose next token is trained, and the loss and every LoRA gradient equal transformers' full-logits loss (with the
    accumulated batch's token count when the Trainer passes one)."""
    trainer = _trainer(tmp_path, fused=False, metrics=False)
    assert trainer.trained_positions_only
    model = trainer.model.train()
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, -100, -100, -100, -100, -100], [-100, 9, 10, -100, -100, -100]])
    inputs = {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 0], [3, 4, 5, 6, 7, 8], [8, 9, 10, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]), "labels": labels}
    seen = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=accumulated)
    hook.remove()
    assert [tuple(s) for s in seen] == [(5, 32)]  # 3 + 0 + 2 trained next tokens, never the 18 positions
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    own = model(**inputs, **({} if accumulated is None else {"num_items_in_batch": accumulated})).loss
    own_grads = torch.autograd.grad(own, [p for p in model.parameters() if p.requires_grad])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(own.item(), rel=1e-6)
    for a, b in zip(grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
