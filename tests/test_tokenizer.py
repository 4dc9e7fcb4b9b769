"""Tokenizers: GPT-2's BPE against an independent copy of OpenAI's encoder.py; SentencePiece round trips and reload."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import random
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import regex
import sentencepiece as spm

from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.tokenizers.gpt2_bpe import PACKAGED_GPT2_DIR, GPT2Tokenizer, gpt2_tokenizer, load_tokenizer
from gpt2_jax.tokenizers.sentencepiece import SentencePieceTokenizer, train_sentencepiece

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "hamlet_gut.txt"

TRICKY = [
    "",
    "Hello world",
    " ",
    "  leading and trailing  ",
    "runs     of    spaces\t\ttabs\t \t and\n\n\nnewlines\r\n",
    "\n",
    "\t",
    "It's I'm you're we've they'll he'd 'S 'T",
    "don't DON'T can''t 's 'll",
    "Café naïve façade Ångström résumé",
    "e\u0301 combining acute, \u0041\u030a, ǅ dz",
    "日本語のテキストと中文字符和한국어",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 skin tone, 🧑‍💻",
    "ZWJ\u200dZWNJ\u200cNBSP\u00a0ideographic space\u3000",
    "control \x00\x01\x07\x1b[31m\x7f\x85 chars",
    "numbers 1234567890 3.14159 1e-10 ١٢٣ ½",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "<|endoftext|> inside text",
    "<|endoftext|><|endoftext|>",
    "a" * 3000,
    "ab " * 1000,
    "\u2581 SentencePiece meta symbol \u2581\u2581",
    "עברית العربية русский ελληνικά हिन्दी",
    "def f(x):\n    return x  # comment\n",
    "\ufeffBOM and \ufffd replacement and \U0010ffff max",
]


# --- an independent GPT-2 BPE: OpenAI's encoder.py algorithm, restated ------------------------------------------
def reference_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class ReferenceEncoder:
    def __init__(self, directory: Path) -> None:
        self.encoder = json.loads((directory / "encoder.json").read_text(encoding="utf-8"))
        merges = (directory / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
        self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = reference_bytes_to_unicode()
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))  # get_pairs
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def reference() -> ReferenceEncoder:
    return ReferenceEncoder(PACKAGED_GPT2_DIR)


LETTER, NUMBER = regex.compile(r"\p{L}"), regex.compile(r"\p{N}")


def unicode_tables_agree(c: str) -> bool:
    """Whether the `regex` module's Unicode tables class `c` as Python's unicodedata does (letter, number, other).

    GPT-2's pre-tokenizer asks its regex engine which characters are letters or numbers, so the answer depends on
    that engine's Unicode version. Here the reference's `regex` module knows Unicode 17, tiktoken Unicode 16 and
    OpenAI's 2019 encoder knew Unicode 12: the ~17k characters new in Unicode 17 split differently (tiktoken treats
    them as unassigned, as the 2019 encoder did). Python's unicodedata is older than both, so the characters where
    it agrees with `regex` are classed alike by every one of them.
    """
    category = unicodedata.category(c)
    return bool(LETTER.match(c)) == category.startswith("L") and bool(NUMBER.match(c)) == category.startswith("N")


def random_unicode_strings(count: int, seed: int = 0) -> list[str]:
    """Strings mixing ASCII, whitespace, contractions, accents, CJK, emoji/ZWJ and arbitrary code points."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789",
        " \t\n\r\x0b\x0c\u00a0\u2003\u3000",
        ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''"],
        "àéîõüçñÅßøœ\u0301\u0308",
        "日本語中文字한국어ひらがなカタカナ",
        ["👨‍👩‍👧", "🏳️‍🌈", "👍🏽", "\u200d", "\ufe0f", "😀"],
        '!?.,;:-_()[]{}<>|/\\"@#$%^&*+=~`',
    ]

    def any_code_point() -> str:
        while True:
            c = chr(rng.randrange(0x110000))
            if not 0xD800 <= ord(c) <= 0xDFFF and unicode_tables_agree(c):
                return c

    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randrange(0, 40)):
            k = rng.randrange(len(pools) + 1)
            parts.append(any_code_point() if k == len(pools) else rng.choice(pools[k]))
        out.append("".join(parts))
    return out


# --- GPT-2 BPE -----------------------------------------------------------------------------------------------------
def test_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert (gpt2.name, gpt2.n_vocab, gpt2.eot_id) == ("gpt2-bpe", 50257, 50256)
    assert isinstance(gpt2, Tokenizer)


def test_endoftext_only_when_allowed(gpt2):
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [50256]
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.encode("a<|endoftext|>b", allow_special=True) == [64, 50256, 65]
    assert gpt2.decode([64, 50256, 65]) == "a<|endoftext|>b"
    batch = gpt2.encode_batch(["<|endoftext|>", "x"], allow_special=True)
    assert batch == [[50256], gpt2.encode("x")]
    assert gpt2.encode_batch(["<|endoftext|>"]) == [[27, 91, 437, 1659, 5239, 91, 29]]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tricky_text_matches_reference_and_round_trips(gpt2, reference, text):
    ids = gpt2.encode(text)
    assert ids == reference.encode(text)
    assert gpt2.decode(ids) == text
    assert gpt2.decode_bytes(ids) == text.encode("utf-8")


def test_corpus_matches_reference(gpt2, reference):
    text = CORPUS.read_text(encoding="utf-8")[:60_000]
    ids = gpt2.encode(text)
    assert len(ids) > 10_000
    assert ids == reference.encode(text)
    assert gpt2.decode(ids) == text
    # The threaded batch path gives the same ids as one call per text.
    chunks = [text[i : i + 5000] for i in range(0, len(text), 5000)]
    assert gpt2.encode_batch(chunks, num_threads=2) == [gpt2.encode(c) for c in chunks]


def test_random_unicode_round_trip_and_parity(gpt2, reference):
    texts = random_unicode_strings(300, seed=1234)
    for text, ids in zip(texts, gpt2.encode_batch(texts)):
        assert ids == reference.encode(text), repr(text)
        assert gpt2.decode(ids) == text, repr(text)


def test_decode_partial_characters_and_bad_ids(gpt2):
    ids = gpt2.encode("😀")  # four bytes over two tokens, neither a whole character
    assert len(ids) == 2
    assert gpt2.decode_bytes(ids[:1]) + gpt2.decode_bytes(ids[1:]) == "😀".encode()
    assert gpt2.decode(ids[:1]).startswith("\ufffd")  # invalid UTF-8 is replaced, never raised
    lone_continuation = [i for i in range(256) if gpt2.decode_bytes([i]) == b"\xa9"]
    assert gpt2.decode(lone_continuation + gpt2.encode("ok")) == "\ufffdok"
    assert gpt2.decode(np.array([15496, 995])) == "Hello world"
    for bad in ([50257], [-1]):
        with pytest.raises(UserError, match="outside"):
            gpt2.decode(bad)


def test_cached_and_picklable(gpt2):
    again = gpt2_tokenizer()
    assert again.encoding is gpt2.encoding  # built once per file pair
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.encode("pickled text") == gpt2.encode("pickled text")
    assert clone.fingerprint == gpt2.fingerprint


def write_vocab_without_last_merge(directory: Path) -> None:
    """Copies of the GPT-2 files whose last merge ('Ġg azed' -> 'Ġgazed', id 50255) is gone."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = (PACKAGED_GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[-2] == "Ġg azed" and lines[-1] == ""
    (directory / "vocab.bpe").write_text("\n".join([*lines[:-2], ""]), encoding="utf-8")
    encoder = json.loads((PACKAGED_GPT2_DIR / "encoder.json").read_text(encoding="utf-8"))
    assert encoder.pop("Ġgazed") == 50255
    (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")


def test_model_directory_files_win(tmp_path, gpt2, reference):
    assert gpt2.encode(" gazed") == [50255]
    write_vocab_without_last_merge(tmp_path / "model")
    own = gpt2_tokenizer(tmp_path / "model")
    ids = own.encode(" gazed")
    assert ids != [50255] and own.decode(ids) == " gazed"
    assert ids == ReferenceEncoder(tmp_path / "model").encode(" gazed")
    assert own.fingerprint != gpt2.fingerprint
    assert load_tokenizer(tmp_path / "model").encode(" gazed") == ids
    # A directory without vocabulary files (or no directory) falls back to the packaged copy.
    (tmp_path / "empty").mkdir()
    assert gpt2_tokenizer(tmp_path / "empty").encode(" gazed") == [50255]
    assert load_tokenizer(None).encode(" gazed") == [50255]


def test_save_writes_both_files(tmp_path, gpt2):
    gpt2.save(tmp_path / "out")
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / "out" / name).read_bytes() == (PACKAGED_GPT2_DIR / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["encoder.json", "vocab.bpe"]  # no temp files
    reloaded = load_tokenizer(tmp_path / "out")
    assert isinstance(reloaded, GPT2Tokenizer) and reloaded.encode("Hello world") == [15496, 995]
    reloaded.save(tmp_path / "out")  # saving onto its own files is harmless
    assert gpt2_tokenizer(tmp_path / "out").encode("Hello world") == [15496, 995]


def test_hugging_face_file_names(tmp_path):
    """A Hugging Face model folder calls the same two files vocab.json + merges.txt (merges possibly with CRLF)."""
    (tmp_path / "vocab.json").write_bytes((PACKAGED_GPT2_DIR / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((PACKAGED_GPT2_DIR / "vocab.bpe").read_bytes().replace(b"\n", b"\r\n"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    tok = load_tokenizer(tmp_path / "model.safetensors")  # a file stands for its folder
    assert tok.encoder_path == tmp_path / "vocab.json"
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "encoder.json").write_text("{not json", encoding="utf-8"), "not a GPT-2 encoder.json"),
        (lambda d: (d / "encoder.json").write_text("[1, 2]", encoding="utf-8"), "not a GPT-2 encoder.json"),
        (lambda d: (d / "vocab.bpe").write_text("#version: 0.2\nĠ t x\n", encoding="utf-8"), "not two tokens"),
        (lambda d: (d / "vocab.bpe").write_text("#version: 0.2\nq z\n", encoding="utf-8"), "missing from encoder"),
        (lambda d: (d / "vocab.bpe").unlink(), "has encoder.json but no vocab.bpe"),
        (lambda d: (d / "encoder.json").write_text('{"a": 0}', encoding="utf-8"), "single-byte tokens"),
    ],
    ids=["not-json", "not-object", "three-tokens", "unknown-merge", "no-merges-file", "no-byte-tokens"],
)
def test_bad_vocabulary_files_give_user_error(tmp_path, damage, message):
    write_vocab_without_last_merge(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match=message):
        gpt2_tokenizer(tmp_path)


def test_missing_directory_gives_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


# --- SentencePiece -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sp")
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    train_sentencepiece([text[:100_000], text[100_000:]], 2000, directory)
    return directory


@pytest.fixture(scope="module")
def sp(sp_dir) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.load(sp_dir / "tokenizer.model")


def test_sentencepiece_trains_and_saves(sp_dir, sp):
    assert sorted(p.name for p in sp_dir.iterdir()) == ["tokenizer.model"]
    assert (sp.name, sp.n_vocab) == ("sentencepiece", 2000)
    assert isinstance(sp, Tokenizer)
    # It learned words: ordinary English costs far fewer tokens than bytes.
    line = "To be, or not to be, that is the question"
    assert len(sp.encode(line)) < len(line) / 2


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_sentencepiece_round_trip(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.decode_bytes(ids) == text.encode("utf-8")


def test_sentencepiece_random_round_trip(sp):
    texts = random_unicode_strings(300, seed=99)
    for text, ids in zip(texts, sp.encode_batch(texts, num_threads=2)):
        assert sp.decode(ids) == text, repr(text)
        assert ids == sp.encode(text)


def test_sentencepiece_decode_agrees_with_sentencepiece(sp):
    text = "Whose  worth's unknown,\talthough his height be taken.\n  Ay, there's the rub"
    ids = sp.encode(text)
    assert sp.processor.decode(ids) == sp.decode(ids) == text


def test_sentencepiece_endoftext(sp):
    eot = sp.eot_id
    assert sp.processor.is_control(eot)
    assert sp.encode("<|endoftext|>", allow_special=True) == [eot]
    ids = sp.encode("one<|endoftext|>two", allow_special=True)
    assert ids.count(eot) == 1 and sp.decode(ids) == "one<|endoftext|>two"
    plain = sp.encode("<|endoftext|>")
    assert eot not in plain and sp.decode(plain) == "<|endoftext|>"
    assert sp.encode_batch(["a<|endoftext|>", "b"], allow_special=True) == [sp.encode("a") + [eot], sp.encode("b")]


def test_sentencepiece_reload_gives_identical_ids(sp_dir, sp, tmp_path):
    text = CORPUS.read_text(encoding="utf-8")[200_000:240_000]
    assert sp.encode(text) == sp.processor.encode(text)  # encoding in newline-ended chunks changes no id
    text += "  \t\n日本 👨‍👩‍👧 ▁"
    loaded = load_tokenizer(sp_dir)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(text) == sp.encode(text)
    sp.save(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.model")
    assert again.encode(text) == sp.encode(text) and again.fingerprint == sp.fingerprint
    assert pickle.loads(pickle.dumps(sp)).encode(text) == sp.encode(text)
    # tokenizer.model wins over GPT-2 files in the same directory.
    gpt2_tokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_sentencepiece_from_files_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta\n" * 200, encoding="utf-8")
    tok = train_sentencepiece([tmp_path / "a.txt"], 300, tmp_path / "model")
    assert tok.decode(tok.encode("alpha  beta\n")) == "alpha  beta\n"
    with pytest.raises(UserError, match="no text"):
        train_sentencepiece(["", "\n\n"], 300, tmp_path / "empty")
    with pytest.raises(UserError, match="could not train"):
        train_sentencepiece(["tiny text"], 100_000, tmp_path / "huge")
    with pytest.raises(UserError, match="Cannot read"):
        train_sentencepiece([tmp_path / "missing.txt"], 300, tmp_path / "nofile")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "bad")


def test_sentencepiece_foreign_models():
    """Models trained elsewhere load if they round-trip exactly; a user-defined <|endoftext|> is text unless allowed."""
    lines = CORPUS.read_text(encoding="utf-8")[:50_000].splitlines()

    def train(**options) -> bytes:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=500, model_type="bpe", minloglevel=2,
            byte_fallback=True, **options
        )  # fmt: skip
        return model.getvalue()

    exact = dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False)
    tok = SentencePieceTokenizer(train(user_defined_symbols=["<|endoftext|>"], **exact))
    assert tok.processor.encode("x<|endoftext|>y").count(tok.eot_id) == 1
    plain = tok.encode("x<|endoftext|>y")
    assert tok.eot_id not in plain and tok.decode(plain) == "x<|endoftext|>y"
    assert tok.encode("x<|endoftext|>y", allow_special=True).count(tok.eot_id) == 1
    with pytest.raises(UserError, match="has no <\\|endoftext\\|> symbol"):
        SentencePieceTokenizer(train(**exact), source="plain.model")
    with pytest.raises(UserError, match="does not give text back exactly"):
        SentencePieceTokenizer(train(control_symbols=["<|endoftext|>"]), source="nfkc.model")
