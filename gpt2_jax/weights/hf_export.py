"""What a Hugging Face export holds besides model.safetensors and config.json (safetensors_io.py): the tokenizer
files, generation_config.json and a model card, written without transformers or tokenizers.

    vocab.json merges.txt        GPT-2's encoder.json and vocab.bpe under the names transformers' GPT2Tokenizer reads
    tokenizer.model              a SentencePiece vocabulary (as we save it)
    tokenizer.json               the same vocabulary in the `tokenizers` library's format (what AutoTokenizer loads)
    tokenizer_config.json        its class, special tokens, context length; special_tokens_map.json: the tokens
    generation_config.json       our sampling defaults (sample.py's): top-k 40, temperature 1, n_ctx / 2 new tokens
    README.md                    the model card: Hugging Face's YAML metadata, then what the model is and came from

GPT-2's `tokenizer.json` is its byte-level BPE: the same regex, vocabulary and merges, so ids equal ours. For a
SentencePiece vocabulary (trained by train_sentencepiece: BPE, identity normalisation, no dummy prefix, byte
fallback) it is a BPE with byte fallback whose merge rules are ranked as SentencePiece ranks its merges: the pair
whose joined piece scores highest merges first (same ids as ours on the Shakespeare corpus, tested). Spaces become
U+2581 before and spaces again after, as SentencePiece does; so a literal U+2581 in a text, which our tokenizer spells
in bytes, is a space to transformers, as it is to SentencePiece itself. In both exports transformers reads a literal
`<|endoftext|>` in a text as the token (ours: `encode(..., allow_special=True)`).
`<|endoftext|>` is the end-of-text, beginning and padding token in every file, and only when the model's vocabulary
holds its id: a model smaller than its tokenizer names no special token at all.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gpt2_jax.config import GPT2Config
from gpt2_jax.console import note
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.base import EOT, Tokenizer
from gpt2_jax.tokenizers.gpt2_bpe import GPT2Tokenizer
from gpt2_jax.tokenizers.sentencepiece import SP_META, SentencePieceTokenizer


def special_id(tokenizer: Tokenizer, config: GPT2Config) -> int | None:
    """The end-of-text id, or None when the model's vocabulary is too small to hold it."""
    return tokenizer.eot_id if tokenizer.eot_id < config.n_vocab else None


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _added_token(content: str, token_id: int) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}  # fmt: skip


# --- tokenizer files ------------------------------------------------------------------------------------------------
def tokenizer_files(tokenizer: Tokenizer, config: GPT2Config) -> dict[str, bytes]:
    """File name -> contents of the tokenizer files transformers reads (besides tokenizer.model, saved as ours)."""
    if isinstance(tokenizer, GPT2Tokenizer):
        tokenizer_json, slow = gpt2_tokenizer_json(tokenizer), "GPT2Tokenizer"
        files = {"vocab.json": tokenizer.encoder_path.read_bytes(), "merges.txt": tokenizer.merges_path.read_bytes()}
        unk = EOT
    elif isinstance(tokenizer, SentencePieceTokenizer):
        if not is_bpe(tokenizer):
            note(
                "this SentencePiece vocabulary is not a BPE one (trained elsewhere), which the tokenizer.json format "
                "cannot reproduce exactly, so the export holds tokenizer.model alone: tokenize with gpt2_jax or "
                "sentencepiece"
            )
            return {}
        tokenizer_json, slow, files = sentencepiece_tokenizer_json(tokenizer), "PreTrainedTokenizerFast", {}
        unk = tokenizer.processor.id_to_piece(tokenizer.processor.unk_id())
    else:
        raise UserError(f"No Hugging Face tokenizer files for a {type(tokenizer).__name__}; export another model.")
    specials = {"unk_token": unk}
    if special_id(tokenizer, config) is not None:
        specials.update(bos_token=EOT, eos_token=EOT, pad_token=EOT)
    tokenizer_config = {
        "tokenizer_class": slow,
        "model_max_length": config.n_ctx,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decoding gives the text back as the model wrote it
        **specials,
    }
    files.update({
        "tokenizer.json": _json(tokenizer_json),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(specials),
    })  # fmt: skip
    return files


def gpt2_tokenizer_json(tokenizer: GPT2Tokenizer) -> dict[str, Any]:
    """GPT-2's byte-level BPE in the `tokenizers` format, from the tokenizer's own encoder.json and vocab.bpe."""
    vocab = json.loads(tokenizer.encoder_path.read_bytes())
    lines = tokenizer.merges_path.read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(EOT, tokenizer.eot_id)],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def is_bpe(tokenizer: SentencePieceTokenizer) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    spec = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_proto).trainer_spec
    return spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE


def sentencepiece_tokenizer_json(tokenizer: SentencePieceTokenizer) -> dict[str, Any]:
    """A SentencePiece BPE vocabulary in the `tokenizers` format (see the module docstring)."""
    sp = tokenizer.processor
    pieces = [sp.id_to_piece(i) for i in range(tokenizer.n_vocab)]
    normal = {p: i for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    # SentencePiece merges the adjacent pair whose joined piece scores highest, whichever way the piece splits.
    ranked = sorted(normal, key=lambda p: (-sp.get_score(normal[p]), normal[p]))
    merges = [[p[:k], p[k:]] for p in ranked for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    specials = [i for i in range(tokenizer.n_vocab) if sp.is_control(i) or sp.is_unknown(i)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(pieces[i], i) for i in specials],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SP_META},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SP_META}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[sp.unk_id()],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": dict(zip(pieces, range(len(pieces)))),
            "merges": merges,
        },
    }


# --- generation config ----------------------------------------------------------------------------------------------
def generation_config(sampling: dict[str, Any], max_new_tokens: int, eot_id: int | None) -> bytes:
    """generation_config.json: `sampling` (temperature, top_k, top_p, repetition_penalty) as transformers names it."""
    ids = {} if eot_id is None else {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    return _json({"do_sample": sampling["temperature"] > 0, **sampling, "max_new_tokens": max_new_tokens, **ids})


# --- model card -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CardFacts:
    """What the card can say about a model; None where it is not known."""

    name: str  # the export's folder name
    source: str  # where the weights were read (LoadedModel.source)
    config: GPT2Config
    n_params: int
    tokenizer: str  # "GPT-2's BPE" or "a 4096-piece SentencePiece vocabulary"
    base_model: str | None = None  # a Hub id
    from_scratch: bool = False
    dataset: str | None = None
    steps: int | None = None
    tokens: int | None = None  # tokens trained on
    val_loss: tuple[int, float] | None = None  # (step, validation loss) of the newest validation
    lora: str | None = None  # e.g. "rank 8, alpha 8, on c_attn": the run trained LoRA adapters, merged here


def model_card(facts: CardFacts) -> bytes:
    """README.md: Hugging Face's YAML metadata block, then a short description."""
    return (_card_metadata(facts) + _card_body(facts)).encode()


def _card_metadata(f: CardFacts) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- gpt2", "- gpt2-jax"]
    if f.lora:
        lines.append("- lora")
    if f.base_model:
        lines.append(f"base_model: {json.dumps(f.base_model)}")
    if f.val_loss is not None:
        step, loss = f.val_loss
        lines += [
            "model-index:",
            f"- name: {json.dumps(f.name)}",
            "  results:",
            "  - task:",
            "      type: text-generation",
            "    dataset:",
            f"      name: {json.dumps(f'held-out part of {f.dataset}' if f.dataset else 'held-out validation text')}",
            "      type: text",
            "    metrics:",
            "    - type: loss",
            f"      value: {loss:.4f}",
            f"      name: validation loss (nats per token, step {step})",
        ]
    return "\n".join([*lines, "---", ""]) + "\n"


def _card_body(f: CardFacts) -> str:
    c = f.config
    lines = [
        f"# {f.name}",
        "",
        f"A GPT-2 of {f.n_params:,} parameters ({c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context {c.n_ctx}, "
        f"vocabulary {c.n_vocab}, {f.tokenizer}), exported by gpt2-jax from {f.source}.",
        "",
    ]
    training = []
    if f.base_model or f.from_scratch:
        training.append(f"- started from: {f.base_model or 'random weights (trained from scratch)'}")
    if f.lora:
        training.append(f"- method: LoRA ({f.lora}), the adapters merged into the base weights in this export")
    if f.dataset:
        training.append(f"- data: {f.dataset}")
    if f.steps is not None:
        tokens = f" ({f.tokens:,} tokens)" if f.tokens else ""
        training.append(f"- optimizer steps: {f.steps:,}{tokens}")
    if f.val_loss is not None:
        training.append(f"- validation loss: {f.val_loss[1]:.4f} nats per token at step {f.val_loss[0]:,}")
    if training:
        lines += ["## Training", "", *training, ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{f.name}")',
        'print(generator("Once upon a time")[0]["generated_text"])',
        "```",
        "",
        "`generation_config.json` holds gpt2-jax's sampling defaults (top-k 40, temperature 1).",
        "",
    ]
    return "\n".join(lines)
