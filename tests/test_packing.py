"""Packing: rows, boundaries and masks survive; packed loss and gradients equal the unpacked ones
(and a contaminated variant fails the same check); gradient accumulation is token-normalised.

Equivalence is measured in fp32 on CPU, where clean packing agrees to ~1e-7: the 1e-4 bound leaves
room for other hardware, and contamination is off by ~1e-1.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from trl import SFTTrainer

from tests.mask_oracles import pipeline_rows
from tuneforge.config.errors import ConfigError
from tuneforge.config.packing_modes import AUTO, CHOICES, FLATTEN, MODES, PAD, ROWS
from tuneforge.config.schemas import (
    PACKING_ATTENTION,
    CollatorConfig,
    ModelConfig,
    PackingConfig,
    QuantConfig,
    TrainConfig,
)
from tuneforge.data.collators import build_collator
from tuneforge.data.packing import ContaminationError, check_no_contamination, pack, probe_rows
from tuneforge.data.tokenize import IGNORE

TOL = 1e-4
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])


def conversations(n: int) -> list[list[dict]]:
    topics = ["the moon", "tea", "rivers", "prime numbers", "owls", "bridges", "jazz", "glaciers", "chess", "salt"]
    convs = []
    for i in range(n):
        t = topics[i % len(topics)]
        conv = [{"role": "user", "content": f"Tell me one fact about {t}."},
                {"role": "assistant", "content": f"Here is a fact about {t}: " + "it is interesting. " * (i % 4 + 1)}]
        if i % 3 == 2:  # some multi-turn rows: two trained spans
            conv += [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": f"{t} again."}]
        convs.append(conv)
    return convs


def rows(tokenizer, n: int) -> Dataset:
    out = pipeline_rows(tokenizer, conversations(n))
    return Dataset.from_dict({"input_ids": out["input_ids"], "labels": out["labels"]})


def collate(tokenizer, mode: str):
    return build_collator(CollatorConfig(), PackingConfig(mode=mode), tokenizer)


# --- packing the rows ----------------------------------------------------------------------------

def test_bfd_keeps_every_sequence_and_its_mask(smollm_tokenizer):
    ds = rows(smollm_tokenizer, 10)
    packed, stats = pack(ds, PackingConfig(mode="bfd"), max_length=160)
    assert stats.rows_out == len(packed) < len(ds) and stats.tokens == sum(len(r) for r in ds["input_ids"])
    assert all(len(r) <= 160 for r in packed["input_ids"])
    # Cut every packed row back into its sequences: the same (ids, labels) pairs as before packing.
    pieces = []
    for ids, labels, lengths in zip(packed["input_ids"], packed["labels"], packed["seq_lengths"]):
        assert sum(lengths) == len(ids)
        start = 0
        for n in lengths:
            pieces.append((tuple(ids[start:start + n]), tuple(labels[start:start + n])))
            start += n
    assert sorted(pieces) == sorted(zip(map(tuple, ds["input_ids"]), map(tuple, ds["labels"])))


def test_wrapped_rows_are_full_and_restart_positions_at_sequence_starts(smollm_tokenizer):
    ds = rows(smollm_tokenizer, 10)
    packed, stats = pack(ds, PackingConfig(mode="wrapped"), max_length=100)
    lengths = [len(r) for r in packed["input_ids"]]
    assert all(n == 100 for n in lengths[:-1]) and 0 < lengths[-1] <= 100
    flat = [x for r in ds["input_ids"] for x in r]
    assert [x for r in packed["input_ids"] for x in r] == flat
    assert [x for r in packed["labels"] for x in r] == [x for r in ds["labels"] for x in r]
    # Position ids restart exactly at the original sequence starts (and at each row start).
    bounds, total = set(), 0
    for r in ds["input_ids"]:
        bounds.add(total)
        total += len(r)
    batch = collate(smollm_tokenizer, "wrapped")([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch
    positions = [p for row, n in zip(batch["position_ids"].tolist(), lengths) for p in row[:n]]
    restarts = {i for i, p in enumerate(positions) if p == 0}
    assert restarts == bounds | set(range(0, total, 100))
    labels = [l for row, n in zip(batch["labels"].tolist(), lengths) for l in row[:n]]
    assert all(labels[i] == IGNORE for i in restarts)  # nothing predicts a sequence's first token
    assert stats.fill == pytest.approx(total / (len(packed) * 100))


def test_bfd_batches_keep_one_packed_row_per_batch_row(smollm_tokenizer):
    tok = smollm_tokenizer
    ds = rows(tok, 10)
    packed, stats = pack(ds, PackingConfig(mode="bfd"), max_length=160)
    batch = collate(tok, "bfd")([packed[i] for i in range(4)])
    # No attention mask: with one, transformers would not isolate the packed sequences.
    assert "attention_mask" not in batch and batch["input_ids"].shape == (4, max(len(packed[i]["input_ids"]) for i in range(4)))
    for r in range(4):
        lengths, n = packed[r]["seq_lengths"], len(packed[r]["input_ids"])
        expected = [p for k in lengths for p in range(k)] + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["position_ids"][r].tolist() == expected  # pads: position 0 each, one-token blocks
        labels = batch["labels"][r].tolist()
        starts = [sum(lengths[:j]) for j in range(len(lengths))]
        assert all(labels[i] == IGNORE for i in starts) and all(l == IGNORE for l in labels[n:])
        # Every other label is the one built at preparation time: masks survive packing.
        assert [l for i, l in enumerate(labels[:n]) if i not in starts] == [
            l for i, l in enumerate(packed[r]["labels"]) if i not in starts]


@pytest.mark.parametrize("name", list(MODES))
def test_every_registered_mode_packs_and_collates_as_it_declares(name, smollm_tokenizer):
    """Each mode of the registry: rows packed (with seq_lengths) exactly when it has a packer, and a batch laid
    out as it declares: padded rows with an attention mask, one flattened row, or one packed row per row."""
    mode = MODES[name]
    ds = rows(smollm_tokenizer, 6)
    packed, stats = pack(ds, PackingConfig(mode=name), max_length=128)
    assert stats.mode == name and stats.tokens == sum(len(r) for r in ds["input_ids"])
    assert ("seq_lengths" in packed.column_names) == (mode.pack_rows is not None)
    examples = [packed[i] for i in range(min(2, len(packed)))]
    batch = collate(smollm_tokenizer, name)(examples)
    real = sum(len(e["input_ids"]) for e in examples)
    assert ("attention_mask" in batch) == (mode.batch == PAD) == (not mode.shares_rows)
    if mode.batch == FLATTEN:
        assert batch["input_ids"].shape == (1, real)
    if mode.batch == ROWS:
        assert batch["input_ids"].shape[0] == len(examples)
    if mode.shares_rows:  # position ids restart at every sequence start
        assert int((batch["position_ids"] == 0).sum()) >= len(examples)


def test_validation_choices_are_the_registry_and_an_unknown_mode_is_refused():
    from tuneforge.config.compose import load_config
    from tuneforge.config.validation import CHOICES as VALIDATED

    assert VALIDATED["packing.mode"] == CHOICES == (AUTO, *MODES)
    from tuneforge.config.paths import conf_dir

    assert {p.stem for p in (conf_dir() / "packing").glob("*.yaml")} == set(CHOICES)  # `packing=NAME` for each
    with pytest.raises(ConfigError, match="packing.mode"):
        load_config(["packing.mode=zigzag"])
    with pytest.raises(ConfigError, match="not a packing mode"):
        pack(Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]}), PackingConfig(mode="zigzag"), 8)


def test_none_and_padding_free_leave_rows_alone(smollm_tokenizer):
    ds = rows(smollm_tokenizer, 4)
    for mode in ("none", "padding_free"):
        same, stats = pack(ds, PackingConfig(mode=mode), 64)
        assert same is ds and stats.fill is None


# --- equivalence on the real embedded model --------------------------------------------------------

@pytest.fixture(scope="module")
def lora_smollm(smollm_dir):
    """The embedded model in fp32 with LoRA adapters (its own copy: adapters change the module tree)."""
    from tuneforge.models.loading import load_model

    model = load_model(smollm_dir, ModelConfig(dtype="float32"), QuantConfig(load_in_4bit=False))
    return get_peft_model(model, LoraConfig(**LORA)).eval()


def loss_and_grads(model, batches, weights, **forward):
    """Sum of weight * loss over batches (one backward), and the lora_B gradients."""
    model.zero_grad()
    total = 0.0
    for batch, w in zip(batches, weights):
        loss = model(**batch, **forward).loss * w
        loss.backward()
        total += float(loss.detach())
    grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_B" in n])
    return total, grads


def n_trained(labels) -> int:
    return int((torch.as_tensor(labels)[..., 1:] != IGNORE).sum())


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def equivalence(model, tok, ds, contaminated: bool, only: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
    """Relative errors (loss, lora_B grads) of packed layouts against every sequence run alone, weighted
    by its trained tokens (= the token-weighted mean loss). Clean layouts, or contaminated ones; `only`
    restricts the layouts to those whose name starts with one of its entries."""
    alone = [collate(tok, "none")([ds[i]]) for i in range(len(ds))]
    counts = [n_trained(b["labels"]) for b in alone]
    ref_loss, ref_grads = loss_and_grads(model, alone, [n / sum(counts) for n in counts], use_cache=False)
    assert ref_grads.abs().sum() > 0  # lora_B's gradient is informative at initialisation (lora_A's is zero)
    packed, _ = pack(ds, PackingConfig(mode="bfd"), max_length=256)
    bfd = collate(tok, "bfd")([packed[i] for i in range(len(packed))])
    if contaminated:
        # The same packed batch with the KV cache on, without the position-id reset, or with an all-ones
        # attention mask: the sequences attend to each other.
        variants = {
            "bfd, use_cache=True": (bfd, {"use_cache": True}),
            "bfd, no position-id reset": ({k: v for k, v in bfd.items() if k != "position_ids"}, {}),
            "bfd, all-ones attention mask": (bfd | {"attention_mask": torch.ones_like(bfd["input_ids"])}, {}),
        }
    else:
        rows_ = [ds[i] for i in range(len(ds))]
        variants = {"padded batch (packing=none)": (collate(tok, "none")(rows_), {}),
                    "padding_free": (collate(tok, "padding_free")(rows_), {}),
                    "bfd": (bfd, {})}
    results = {}
    for name, (batch, kw) in variants.items():
        if only and not name.startswith(only):
            continue
        loss, grads = loss_and_grads(model, [batch], [1.0], **({"use_cache": False} | kw))
        results[name] = (relative(loss, ref_loss), relative(grads, ref_grads))
    return results


def report(title, results, capsys):
    with capsys.disabled():
        print(f"\n{title} (relative error vs unpacked: loss, lora_B grads)")
        for name, (l, g) in results.items():
            print(f"  {name:30s} loss {l:.1e}  grads {g:.1e}")


def test_packed_equals_unpacked_on_the_embedded_model(smollm_tokenizer, lora_smollm, capsys):
    ds = rows(smollm_tokenizer, 3).select_columns(["input_ids", "labels"])
    clean = equivalence(lora_smollm, smollm_tokenizer, ds, contaminated=False, only=("bfd",))
    report("embedded SmolLM2-135M, fp32", clean, capsys)
    assert all(l < TOL and g < TOL for l, g in clean.values()), clean


@pytest.mark.slow
def test_contaminated_packing_fails_on_the_embedded_model(smollm_tokenizer, lora_smollm, capsys):
    ds = rows(smollm_tokenizer, 3).select_columns(["input_ids", "labels"])
    bad = equivalence(lora_smollm, smollm_tokenizer, ds, contaminated=True)
    report("embedded SmolLM2-135M, fp32, contaminated", bad, capsys)
    assert all(l > TOL and g > TOL for l, g in bad.values()), bad


@pytest.mark.parametrize("contaminated", [False, True])
def test_packing_equivalence_small_model(smollm_dir, smollm_tokenizer, contaminated, capsys):
    """The same check on a small random Llama (fast): clean layouts pass, contaminated ones fail."""
    model = get_peft_model(tiny_llama(smollm_dir), LoraConfig(**LORA)).eval()
    ds = rows(smollm_tokenizer, 5).select_columns(["input_ids", "labels"])
    results = equivalence(model, smollm_tokenizer, ds, contaminated)
    report(f"small random Llama, fp32{', contaminated' if contaminated else ''}", results, capsys)
    if contaminated:
        assert all(l > TOL and g > TOL for l, g in results.values()), results
    else:
        assert all(l < TOL and g < TOL for l, g in results.values()), results


def test_probe_passes_clean_packing_and_fails_contaminated(smollm_dir, smollm_tokenizer):
    tok, model = smollm_tokenizer, tiny_llama(smollm_dir).eval()
    ds = rows(tok, 6)
    probe = probe_rows(ds)
    assert len(probe) == 2
    clean = collate(tok, "padding_free")
    assert check_no_contamination(model, clean, probe, tolerance=1e-5) < 1e-6

    def no_reset(examples):  # what a model that ignores position ids would compute
        batch = clean(examples)
        batch.pop("position_ids")
        return batch

    # A random small model barely cares what it attends to: a tight tolerance (fp32) still sees it.
    with pytest.raises(ContaminationError, match="attend to each other"):
        check_no_contamination(model, no_reset, probe, tolerance=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("arm", ["packed", "unpacked"])
def test_probe_fails_on_a_non_finite_forward(smollm_dir, smollm_tokenizer, arm, bad):
    """A NaN/inf loss in either arm fails the probe: `error > tolerance` alone would let a NaN through."""
    tok, model = smollm_tokenizer, tiny_llama(smollm_dir).eval()
    probe = probe_rows(rows(tok, 6))
    packed_width = sum(len(r) for r in probe)

    def poison(module, args, kwargs, output):  # the packed arm is the one row holding every probe sequence
        is_packed = kwargs["input_ids"].shape[-1] == packed_width
        if is_packed == (arm == "packed"):
            output.logits = output.logits * bad
        return output

    model.register_forward_hook(poison, with_kwargs=True)
    with pytest.raises(ContaminationError, match=f"the {arm} forward gave a non-finite loss"):
        check_no_contamination(model, collate(tok, "padding_free"), probe)


def tiny_llama(smollm_dir, attn: str = "sdpa", layers: int = 2):
    """A small random Llama with SmolLM2's vocabulary (the tokenizer's ids stay valid)."""
    config = AutoConfig.from_pretrained(smollm_dir)
    config.update(dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16,
                       initializer_range=0.1))  # sharper attention than 0.02: contamination shows more
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def test_left_and_right_padding_give_the_same_loss(smollm_dir, smollm_tokenizer):
    tok, model = smollm_tokenizer, tiny_llama(smollm_dir).eval()
    ds = rows(tok, 4)
    examples = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        losses = {side: model(**build_collator(CollatorConfig(), PackingConfig(), tok, side)(examples),
                              use_cache=False).loss for side in ("right", "left")}
    assert relative(losses["left"], losses["right"]) < TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_honour_packed_position_ids(smollm_dir, smollm_tokenizer, attn):
    model = tiny_llama(smollm_dir, attn).eval()
    assert check_no_contamination(model, collate(smollm_tokenizer, "padding_free"), probe_rows(rows(smollm_tokenizer, 6))) < 1e-5


@pytest.mark.parametrize("mode", ["bfd", "padding_free", "wrapped"])
def test_flex_attention_with_packing_is_refused_on_a_cpu_before_weights_load(mode):
    """Whether flex_attention isolates packed sequences on a CPU depends on the processor (NaN on an AMD EPYC,
    clean on an Intel Xeon): refused on a CPU whatever the processor; on CUDA it is the GPU harness's question."""
    from tuneforge.config import device
    from tuneforge.config.errors import ConfigError
    from tuneforge.config.schemas import TuneforgeConfig

    cfg = TuneforgeConfig()
    cfg.packing.mode, cfg.model.attn_implementation = mode, "flex_attention"
    with pytest.raises(ConfigError, match=rf"packing.mode={mode} with model.attn_implementation=flex_attention on a CPU"):
        device.resolve(cfg, cuda=False)
    assert device.resolve(cfg, cuda=True).model.attn_implementation == "flex_attention"
    cfg.packing.mode = "none"  # unpacked rows carry an attention mask: nothing to isolate
    device.resolve(cfg, cuda=False)
    cfg.packing.mode = "auto"  # decides none on a CPU
    assert device.resolve(cfg, cuda=False).packing.mode == "none"


def test_flex_attention_with_packing_is_refused_by_the_cli_config_check():
    """The same check runs where every command validates its config, before anything loads."""
    from tuneforge.config.compose import load_config
    from tuneforge.config.errors import ConfigError

    overrides = ["packing=bfd", "model.attn_implementation=flex_attention"]
    if torch.cuda.is_available():
        assert load_config(overrides).packing.mode == "bfd"
    else:
        with pytest.raises(ConfigError, match="flex_attention on a CPU"):
            load_config(overrides)


def test_packing_attention_list_matches_transformers():
    """config.PACKING_ATTENTION: the implementations whose mask builder detects packed sequences."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert set(PACKING_ATTENTION) <= set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


# --- gradient accumulation ---------------------------------------------------------------------------

class GrabGrads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = torch.cat([p.grad.detach().flatten().clone() for n, p in model.named_parameters() if "lora_B" in n])


def one_step(smollm_dir, tokenizer, ds, mode, batch_size, accumulation, tmp_path):
    from tuneforge.config.library_args import trainer_arguments
    from tuneforge.config.schemas import TuneforgeConfig

    model = get_peft_model(tiny_llama(smollm_dir), LoraConfig(**LORA))
    cfg = TrainConfig(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
                      learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1, report_to=[], max_length=512)
    grab = GrabGrads()
    trainer = SFTTrainer(model=model, args=trainer_arguments(TuneforgeConfig(train=cfg), tmp_path / f"{mode}-{batch_size}"), train_dataset=ds,
                         processing_class=tokenizer, data_collator=collate(tokenizer, mode), callbacks=[grab])
    trainer.train()
    return trainer.state.log_history[0]["loss"], grab.grads


@pytest.mark.parametrize("mode", ["none", "padding_free"])
def test_gradient_accumulation_is_token_normalised(smollm_dir, smollm_tokenizer, mode, tmp_path, capsys):
    tok = smollm_tokenizer
    ds = rows(tok, 8)
    counts = [n_trained([l]) for l in ds["labels"]]
    assert len(set(counts)) > 2  # micro-batches carry different token counts: a naive mean of means differs
    loss_8, grads_8 = one_step(smollm_dir, tok, ds, mode, 8, 1, tmp_path)
    loss_2x4, grads_2x4 = one_step(smollm_dir, tok, ds, mode, 2, 4, tmp_path)
    errors = relative(loss_2x4, loss_8), relative(grads_2x4, grads_8)
    with capsys.disabled():
        print(f"\ngradient accumulation ({mode}): 8x1 vs 2x4 relative error: loss {errors[0]:.1e}, lora_B grads {errors[1]:.1e}")
    assert errors[0] < TOL and errors[1] < TOL


def test_mean_of_micro_batch_means_would_fail_the_check(smollm_dir, smollm_tokenizer):
    """Why token-count normalisation matters: averaging each micro-batch's own mean loss (the classic
    gradient-accumulation bug) is off by far more than the tolerance on the same rows."""
    tok = smollm_tokenizer
    model = get_peft_model(tiny_llama(smollm_dir), LoraConfig(**LORA)).eval()
    ds, c = rows(tok, 8), collate(tok, "none")
    with torch.no_grad():
        whole = model(**c([ds[i] for i in range(8)]), use_cache=False).loss
        means = [model(**c([ds[i], ds[i + 1]]), use_cache=False).loss for i in range(0, 8, 2)]
    # Even a random model, whose per-token losses are all near ln(vocab), is off by ~9e-4.
    assert relative(sum(means) / 4, whole) > TOL
