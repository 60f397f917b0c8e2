"""`tuneforge export`: a run's adapter folded into its base and written for serving (hf, gguf, ollama), each export
read back by an independent reader and compared with the adapter (DESIGN rule 13); every bad input refused in one
line with exit 2 and nothing written.

One tiny run trained once for the module, on a random 2-layer model of the embedded model's architecture whose
tokenizer is the embedded one cut to its first 1024 tokens: reading a GGUF back parses every token and merge in
Python (the gguf package's reader, twice per load in transformers), ~25x faster than with the full 49152. Three
exports of it through the CLI entry point (gguf f16, ollama q8_0, hf read in a fresh process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_in_process

QUICK = ["train.max_steps=2", "train.per_device_train_batch_size=2", "train.max_length=96", "data.builtin_rows=40",
         "eval.num_samples=4", "eval.max_new_tokens=8", "eval.batch_size=4", "eval.before_after=false",
         "train.save_strategy=no", "train.report_to=none", "train.learning_rate=3e-2", "peft.lora_dropout=0.0"]


VOCAB = 1024


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, smollm_dir) -> str:
    """conftest.tiny_model's shape with the embedded tokenizer cut to VOCAB tokens (the merges that stay inside)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("small") / "model"
    out.mkdir()
    spec = json.loads((Path(smollm_dir) / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < VOCAB}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m[0] in vocab and m[1] in vocab
                               and m[0] + m[1] in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < VOCAB]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(smollm_dir) / name, out / name)
    config = AutoConfig.from_pretrained(smollm_dir)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_model) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    result = cli_in_process("train", f"model.name_or_path={small_model}", *QUICK, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory) -> dict:
    """{form: (out dir, CompletedProcess)} of the three exports."""
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for form, args in {"gguf": ["format=gguf", "quant=f16"], "ollama": ["format=ollama", "quant=q8_0"],
                       "hf": ["format=hf"]}.items():
        out = root / form
        done[form] = out, cli_in_process("export", f"run_dir={run_dir}", *args, f"out={out}")
        assert done[form][1].returncode == 0, done[form][1].stdout[-3000:] + done[form][1].stderr[-3000:]
    return done


def _report(out: Path) -> dict:
    return json.loads((out / "export.json").read_text())


@pytest.mark.slow  # the module's trained run and its three exports
def test_gguf_f16_agrees_on_every_answer_and_carries_the_training_template(exports, run_dir):
    from transformers import AutoTokenizer

    out, result = exports["gguf"]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model-f16.gguf"]
    report = _report(out)
    (c,) = report["checks"]
    assert c["reader"] == "transformers' GGUF loader" and c["unquantized"]
    assert c["agreement"] == 1.0 and c["prompts"] == report["held_out_prompts"] == 4
    assert c["template_same_text"] == c["template_same_ids"] == 4  # the template in the file renders as training
    assert 0 <= c["max_abs_logit_diff"] < 5e-2  # f16 rounding of the weights only
    assert c["stops_end_of_turn"] and c["pad_is_not_eos"]
    assert c["scores"]["exact_match"] == report["adapter"]["exact_match"]
    assert "gguf f16" in result.stdout and "agree" in result.stdout
    # What the file holds, read with the gguf package's own reader.
    import gguf

    fields = gguf.GGUFReader(out / "model-f16.gguf").fields
    trained = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert fields["tokenizer.chat_template"].contents() == trained.chat_template
    assert fields["tokenizer.ggml.padding_token_id"].contents() == trained.pad_token_id != trained.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"].contents() == trained.convert_tokens_to_ids("<|im_end|>")
    types = fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[trained.convert_tokens_to_ids("<|im_start|>")]][0]) == gguf.TokenType.CONTROL


@pytest.mark.slow  # the module's trained run and its three exports
def test_ollama_export_is_a_quantized_gguf_and_a_modelfile(exports):
    out, _ = exports["ollama"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model-q8_0.gguf"]
    report = _report(out)
    (c,) = report["checks"]
    assert not c["unquantized"] and 0 <= c["agreement"] <= 1 and c["max_abs_logit_diff"] > 0  # reported, not required
    assert c["template_same_ids"] == c["prompts"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # The run's system prompt (the default format's empty one): the system turn is always written, as in training.
    assert 'SYSTEM """"""' in modelfile and "<|im_start|>system\n{{ .System }}<|im_end|>\n{{ range .Messages }}" \
        in modelfile
    assert report["modelfile"]["family"] == "chatml"
    assert report["modelfile"]["template_renders_like_training"] == "4/4"


@pytest.mark.slow  # the module's trained run and its three exports
def test_hf_export_read_in_a_fresh_process_stops_at_the_end_of_turn(exports, run_dir):
    out, _ = exports["hf"]
    report = _report(out)
    (c,) = report["checks"]
    assert c["reader"] == "transformers in a fresh process"
    assert c["agreement"] == 1.0 and c["max_abs_logit_diff"] < 1e-3 and c["template_same_ids"] == c["prompts"]
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    # SmolLM2's end-of-turn token <|im_end|> is its EOS (id 2); PAD was moved off it (DESIGN rule 1).
    assert c["stops_end_of_turn"] and 2 in eos and generation["pad_token_id"] not in eos
    assert (out / "chat_template.jinja").read_text() == (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".*partial*"))  # no scratch folder left behind


@pytest.mark.parametrize("model_type,quant", [("llama", "f32"), ("llama", "q4_0"), ("mistral", "f32"),
                                              ("qwen2", "f32"), ("qwen3", "f32"), ("gemma2", "f32"),
                                              ("gemma3_text", "f32")])
def test_gguf_writer_round_trips_every_family_through_transformers(small_model, tmp_path, model_type, quant):
    """The writer alone on a random 2-layer model of each family (norm weights random too, so that Gemma's 1 + w
    shows): f32 read back by transformers' GGUF loader gives the same logits exactly; a 4-bit type differs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tuneforge.models.gguf_writer import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(small_model)
    # Qwen3: transformers' reader does not read the head width, and takes the Qwen3 default (128).
    config = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=128 if model_type == "qwen3" else 16, vocab_size=VOCAB,
                                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    written = write_gguf(model, tokenizer, Path(small_model), tmp_path / "m.gguf", quant, 2, f"tiny-{model_type}")
    assert written.pre_tokenizer == "gpt-2" and not written.fallbacks
    read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("Write 4 July 1976 as YYYY-MM-DD")["input_ids"]])
    with torch.no_grad():
        diff = float((model(ids).logits - read(ids).logits).abs().max())
    assert diff == 0.0 if quant == "f32" else 0 < diff < 1.0


def test_architectures_outside_the_table_are_refused_by_name():
    from transformers import AutoConfig

    from tuneforge.config.errors import ConfigError
    from tuneforge.models.gguf_writer import family

    with pytest.raises(ConfigError, match="model_type 'gemma' is not exported: transformers' GGUF reader"):
        family(AutoConfig.for_model("gemma"))
    with pytest.raises(ConfigError, match="model_type 'phi3' is not an architecture tuneforge writes as GGUF"):
        family(AutoConfig.for_model("phi3"))
    with pytest.raises(ConfigError, match="rope scaling 'llama3'"):
        family(AutoConfig.for_model("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 8192}))


def test_template_and_agreement_problems_are_named():
    from tuneforge.eval.verify_export import FormCheck

    good = dict(form="gguf f16", reader="r", unquantized=True, agreement=1.0, scores={}, max_abs_logit_diff=0.0,
                argmax_disagreement=0.0, template_same_text=4, template_same_ids=4, prompts=4,
                stops_end_of_turn=True, pad_is_not_eos=True)
    assert FormCheck(**good).problems == []
    bad = FormCheck(**{**good, "agreement": 0.75, "template_same_ids": 3, "stops_end_of_turn": False},
                    differing=[{"prompt": "p"}])
    assert [p.split(":")[1].split(",")[0].strip() for p in bad.problems] == [
        "the template read back renders 1 of 4 held-out prompts unlike training",
        "the end-of-turn token is not among the stop ids read back", "unquantized"]
    assert FormCheck(**{**good, "unquantized": False, "agreement": 0.5}).problems == []  # a quantized one reports


def test_modelfile_refuses_a_template_it_cannot_convert(small_model):
    from transformers import AutoTokenizer

    from tuneforge.config.errors import ConfigError
    from tuneforge.models import modelfile

    tokenizer = AutoTokenizer.from_pretrained(small_model)
    fam, system = modelfile.convert(tokenizer, None)  # SmolLM2's template: ChatML with a default system prompt
    assert fam.name == "chatml" and system.startswith("You are a helpful AI assistant named SmolLM")
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    with pytest.raises(ConfigError, match="none of the families tuneforge converts"):
        modelfile.convert(tokenizer, "")


def _refused(*args: str, cwd: Path) -> str:
    result = cli_in_process("export", *args, cwd=cwd)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow  # the module's trained run
def test_bad_input_is_one_line_exit_2_and_nothing_written(run_dir, tmp_path):
    before = sorted(p.name for p in run_dir.iterdir())
    assert "cannot write that type" in _refused(f"run_dir={run_dir}", "quant=q4_k", cwd=tmp_path)
    assert "choose one of hf, gguf, ollama" in _refused(f"run_dir={run_dir}", "format=onnx", cwd=tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "exists and is not empty" in _refused(f"run_dir={run_dir}", f"out={taken}", cwd=tmp_path)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    # A run without an adapter (training did not finish).
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("adapter", "export*"))
    assert "no adapter to export" in _refused(f"run_dir={unfinished}", cwd=tmp_path)
    # An architecture the GGUF writer does not write: refused from the base's config alone.
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("export*"))
    config = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(config.replace(_base(config), f"name_or_path: {gpt2}"))
    assert "model_type 'gpt2' is not an architecture tuneforge writes as GGUF" in _refused(
        f"run_dir={other}", "format=gguf", cwd=tmp_path)
    assert "format=hf writes full-precision" in _refused(f"run_dir={run_dir}", "format=hf", "quant=q8_0", cwd=tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written into the run
    assert not list(tmp_path.glob("*/export-*"))


def _base(config_yaml: str) -> str:
    return next(line.strip() for line in config_yaml.splitlines() if line.strip().startswith("name_or_path:"))
