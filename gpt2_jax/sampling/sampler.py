"""`Sampler`: a model ready to sample from, text in and text out, as Gemma's `gm.text.Sampler` is.

Built once from the params, config and tokenizer (or from what `load_model` returns), it lays the weights out for
decoding once (`model.decode.decode_weights` copies the matrices: worth doing once per model, not per call) and
then serves any number of calls: `generate` returns texts, `samples` yields `Sample`s batch by batch and can stream
the first row of each batch as it decodes. `generate_text` is the one-call form the training loop's samples use.

Sample j of prompt i draws with row id `i * nsamples + j`, so its text depends on the seed, not on `batch_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.sampling.generate import STOP_STRING, Request, generate_tokens
from gpt2_jax.sampling.processors import SamplingConfig
from gpt2_jax.sampling.text import RowText, encode_prompt
from gpt2_jax.tokenizers.base import Tokenizer

if TYPE_CHECKING:
    from gpt2_jax.weights.loading import LoadedModel

STREAM_CHUNK = 16  # tokens per device call while streaming or watching for stop strings

OnText = Callable[[int, str], None]


@dataclasses.dataclass
class Sample:
    """One generated continuation and how it ended."""

    prompt: str
    text: str
    tokens: list[int]  # the generated ids, prompt excluded, cut like the text
    stop_reason: str  # 'length', 'endoftext' or 'stop'
    index: int  # 0-based sample number for its prompt
    prompt_index: int = 0


class Sampler:
    """Text continuations from one model; see the module docstring."""

    def __init__(self, params: Any, config: GPT2Config, tokenizer: Tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.weights = decode_weights(params, config)

    @classmethod
    def from_model(cls, model: LoadedModel) -> Sampler:
        """A sampler for what `gpt2_jax.load_model` returned."""
        return cls(model.params, model.config, model.tokenizer)

    def samples(
        self,
        prompts: Sequence[str],
        *,
        nsamples: int = 1,
        batch_size: int | None = None,
        length: int = 100,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        stop: Sequence[str] = (),
        on_text: OnText | None = None,
    ) -> Iterator[Sample]:
        """`nsamples` continuations of each prompt ('' is unconditional; a lone string is one prompt), batch by batch.

        A batch may mix prompts. `on_text(j, text)` streams the first sample of each batch as it decodes. A short
        last batch is filled with spare rows (discarded) so that it reuses the compiled shapes.
        """
        prompts = _prompt_list(prompts)
        chunk = STREAM_CHUNK if on_text is not None or stop else None
        request = Request(length, sampling, seed, self.tokenizer.eot_id, chunk=chunk)
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(nsamples)]
        batch_size = min(batch_size or len(rows), len(rows))
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            batch += [batch[-1]] * (batch_size - len(batch))
            row_ids = [i * nsamples + j for i, j in batch]
            texts = self._decode_batch([encoded[i] for i, _ in batch], row_ids, request, stop, on_text, batch[0][1])
            for (i, j), (text, reason) in zip(batch[: len(rows) - start], texts):
                yield Sample(prompts[i], text.text, text.tokens, reason, j, i)

    def _decode_batch(
        self,
        prompts: list[list[int]],
        row_ids: list[int],
        request: Request,
        stop: Sequence[str],
        on_text: OnText | None,
        streamed: int,
    ) -> list[tuple[RowText, str]]:
        """Each row's text and stop reason; row 0's text goes to `on_text` as sample `streamed` while it decodes."""
        texts = [RowText(self.tokenizer, stop) for _ in prompts]

        def on_chunk(new: dict[int, list[int]]) -> list[int]:
            stopped = [r for r, ids in new.items() if texts[r].extend(ids)]
            if on_text is not None:
                on_text(streamed, texts[0].new_text())
            return stopped

        out = generate_tokens(self.weights, self.config, prompts, request, row_ids=row_ids, on_chunk=on_chunk)
        if on_text is not None:
            on_text(streamed, texts[0].new_text(final=True))
        return [(t, t.stop_reason if t.stop_reason == STOP_STRING else reason) for t, (_, reason) in zip(texts, out)]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        nsamples: int = 1,
        length: int = 100,
        temperature: float = 1.0,
        top_k: int = 40,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """Per prompt ('' is unconditional; a lone string is one prompt), its `nsamples` texts, prompt excluded.

        temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; a sample ends at `<|endoftext|>`,
        at the first of the `stop` strings (cut off) or after `length` tokens.
        """
        prompts = _prompt_list(prompts)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        texts: list[list[str]] = [[] for _ in prompts]
        samples = self.samples(
            prompts, nsamples=nsamples, batch_size=batch_size, length=length, sampling=sampling, seed=seed, stop=stop
        )
        for s in samples:
            texts[s.prompt_index].append(s.text)
        return texts


def _prompt_list(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list; a lone string is one prompt, not one per character."""
    return [prompts] if isinstance(prompts, str) else list(prompts)


def generate_text(
    params: Any,
    config: GPT2Config,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    nsamples_per_prompt: int = 1,
    length: int = 100,
    temperature: float = 1.0,
    top_k: int = 40,
    top_p: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
    batch_size: int | None = None,
) -> list[list[str]]:
    """Per prompt, its `nsamples_per_prompt` generated continuations (prompt excluded); '' means unconditional.

    One call, one `Sampler`: for repeated calls build a `Sampler` once (it copies the weights into decode layout).
    """
    return Sampler(params, config, tokenizer).generate(
        prompts,
        nsamples=nsamples_per_prompt,
        length=length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop or (),
        batch_size=batch_size,
    )
