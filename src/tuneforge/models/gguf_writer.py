"""A merged model written as one GGUF file with ggml's own Python library (`gguf`): its writer, its tensor-name map,
its vocabulary helpers and its quantizers. What the package does not do is written here, each with its reason: the
hyper-parameters of each architecture (llama.cpp's converter script holds them, not the package), the q/k row order
llama.cpp's rotary embedding expects for the Llama family, the token types of special tokens that sit inside the base
vocabulary, the padding rows of a resized embedding, and the choice of pre-tokenizer name.

The families written are those both llama.cpp (through the `gguf` package's architecture names) and transformers'
GGUF reader know, since every export is read back by that reader before it is published (eval/verify_export.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tuneforge.config.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    # The llama.cpp architecture name (gguf.MODEL_ARCH_NAMES), the key prefix of every hyper-parameter.
    arch: str
    # llama.cpp's Llama graph applies rotary embeddings to interleaved pairs, HF's to halves: q/k rows are reordered
    # (transformers' GGUF reader undoes it for the `llama` architecture only).
    permute_qk: bool = False
    # Gemma stores RMSNorm weights as w where the model multiplies by (1 + w); GGUF stores 1 + w.
    norm_plus_one: bool = False


# HF model_type -> how it is written. Refused by name otherwise (see `family`).
FAMILIES = {
    "llama": Family("llama", permute_qk=True),  # Llama 2/3 and SmolLM2
    # llama.cpp writes Mistral as llama, and so does this: transformers' reader would turn a file named "mistral"
    # into model_type mistral, for which the gguf package has no tensor-name map (transformers 5.25, gguf 0.19).
    "mistral": Family("llama", permute_qk=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma2": Family("gemma2", norm_plus_one=True),
    "gemma3_text": Family("gemma3", norm_plus_one=True),
}
# Known to the gguf package but not written: why, for the refusal.
REFUSED = {
    "gemma": "transformers' GGUF reader has no `gemma` (Gemma 1) architecture, so the export could not be verified",
    "gemma3": "a Gemma 3 vision-language model: export its text model (model_type gemma3_text)",
}

# Tensors kept in float32 whatever the type: 1-D tensors (norms, biases), as llama.cpp's converter does.
_UNQUANTIZED = ("f32", "f16", "bf16")


def quant_types() -> dict[str, object]:
    """{name: GGMLQuantizationType} of every type the installed `gguf` package can write: f32, f16, and each type
    whose quantizer it implements (the K-quants and i-quants it can only read)."""
    import gguf
    from gguf import quants

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
    for qtype, impl in quants._type_traits.items():  # the package's registry of implemented types
        # A file type names the whole file (general.file_type); a type without one (MXFP4: MoE experts only) is not
        # meant for every tensor of a dense model.
        if "quantize_blocks" in vars(impl) and hasattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}"):
            types[qtype.name.lower()] = qtype
    return types


def check_quant(quant: str) -> None:
    types = quant_types()
    if quant not in types:
        raise ConfigError(f"quant={quant}: the gguf package cannot write that type; choose one of "
                          f"{', '.join(types)}.")


def is_unquantized(quant: str) -> bool:
    return quant in _UNQUANTIZED


def family(config) -> Family:
    """How a model of this config is written, or a refusal naming its architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ConfigError(f"export: model_type {model_type!r} is not exported: {REFUSED[model_type]}.")
    if model_type not in FAMILIES:
        raise ConfigError(f"export: model_type {model_type!r} is not an architecture tuneforge writes as GGUF "
                          f"(supported: {', '.join(FAMILIES)}).")
    rope = (getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"export: model_type {model_type!r} with rope scaling {rope.get('rope_type')!r} is not "
                          "written by tuneforge's GGUF export (only the default rotary embedding).")
    return FAMILIES[model_type]


def _permute(weights, n_head: int):
    """HF's half-split rotary layout -> llama.cpp's interleaved one (the inverse of transformers' reader)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _pre_tokenizer(tokenizer_json: dict, source_pre: Optional[str]) -> tuple[str, Optional[str]]:
    """(llama.cpp's pre-tokenizer name, a note when it is a guess). llama.cpp identifies a pre-tokenizer by a hash
    its converter script computes; the package holds no such table, so it is recognised from tokenizer.json here."""
    if source_pre:  # the base model itself arrived as a GGUF (the embedded model): its own name
        return source_pre, None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split is not None:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        pattern = (split.get("pattern") or {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():  # the reader's own table: it rebuilds the same split
            if regex == pattern:
                return name, None
    if [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    return "default", ("tokenizer.json's pre-tokenizer is not one llama.cpp names; written as 'default' (llama.cpp "
                       "may split text differently from training: check with benchmarks/llama_cpp_check.py)")


def _vocab(tokenizer, tokenizer_dir: Path, rows: int):
    """(model name, tokens, scores, types) from the package's vocabulary helpers, padded to the embedding rows."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    vocab = None
    for helper in (BpeVocab, LlamaHfVocab):
        try:
            vocab = helper(tokenizer_dir)
            break
        except (FileNotFoundError, TypeError):
            continue
    if vocab is None:
        raise ConfigError("export: the tokenizer is neither GPT-2 byte-level BPE nor Llama byte-fallback BPE, the "
                          "tokenizer.json kinds the gguf package's vocabulary helpers read.")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # BpeVocab types every token of the base vocabulary NORMAL, the special ones too (<|im_start|> is id 1 of
    # SmolLM2's): llama.cpp would then split them as text. tokenizer.json says which are special.
    for tid, added in tokenizer.added_tokens_decoder.items():
        if tid < len(types):
            types[tid] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if len(tokens) > rows:
        raise ConfigError(f"export: the tokenizer has {len(tokens)} tokens but the embedding {rows} rows.")
    # A resized embedding (DESIGN rule 9) has rows no token uses: llama.cpp wants one token per row.
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return vocab.tokenizer_model, tokens, scores, types


def _hyperparameters(writer, config, fam: Family) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None) and fam.arch.startswith("gemma"):
        writer.add_sliding_window(config.sliding_window)
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))


@dataclass
class Written:
    path: Path
    quant: str
    tensors: int
    # Tensors written in another type than asked (rows the quantizer's block does not divide): name -> type.
    fallbacks: dict[str, str]
    pre_tokenizer: str
    notes: list[str]


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, quant: str, end_of_turn_id: int,
               name: str, source_pre: Optional[str] = None) -> Written:
    """Write `model` (merged, full precision) and its tokenizer (saved in `tokenizer_dir`) to `path` as `quant`.
    The chat template written is the tokenizer's (the training template); PAD, EOS and the end-of-turn id are the
    run's."""
    import gguf
    import numpy as np
    import torch
    from gguf import quants

    config = model.config
    fam = family(config)
    qtype = quant_types()[quant]
    notes: list[str] = []
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    pre, note = _pre_tokenizer(tokenizer_json, source_pre)
    notes += [note] if note else []

    writer = gguf.GGUFWriter(path, fam.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _hyperparameters(writer, config, fam)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "f32" else
                         getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    rows = model.get_input_embeddings().weight.shape[0]
    model_name, tokens, scores, types = _vocab(tokenizer, tokenizer_dir, rows)
    writer.add_tokenizer_model(model_name)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=model_name == "gpt2", n_vocab=rows)
    # The run's ids, not the base model's config.json (whose PAD may be EOS: DESIGN rule 1).
    special.special_token_ids = {k: v for k, v in {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id, "eot": end_of_turn_id}.items() if v is not None}
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    fallbacks: dict[str, str] = {}
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the reader ties it back: no output.weight means tied
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"export: the gguf package's tensor-name map has no name for {hf_name} "
                              f"({fam.arch}); this model cannot be written as GGUF.")
        data = tensor.detach().to(torch.float32)
        if fam.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = _permute(data, heads)
        if fam.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1
        array = data.numpy()
        if array.ndim == 1 or quant == "f32":
            writer.add_tensor(gguf_name, array.astype(np.float32))
        else:
            try:
                writer.add_tensor(gguf_name, quants.quantize(array, qtype), raw_dtype=qtype)
            except quants.QuantError:  # rows not a multiple of the block: llama.cpp's converter falls back to f16
                writer.add_tensor(gguf_name, array.astype(np.float16))
                fallbacks[gguf_name] = "f16"
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Written(path, quant, count, fallbacks, pre, notes)


def source_pre_tokenizer(name_or_path: str) -> Optional[str]:
    """tokenizer.ggml.pre of a base model that arrived as a GGUF (the embedded model), else None."""
    from tuneforge.models import embedded

    if not embedded.is_embedded(name_or_path):
        return None
    spec = embedded.EMBEDDED.get(name_or_path[len(embedded.PREFIX):])
    if spec is None or spec.gguf_name is None:
        return None
    import gguf

    field = gguf.GGUFReader(embedded.locate_gguf(spec)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None
