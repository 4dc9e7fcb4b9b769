"""The PyTorch reference for tests: Hugging Face transformers' `GPT2LMHeadModel` built from our params.

Every parity test in the suite compares against this one model: torch on the CPU, float32, eval mode, eager
attention, all dropout off, the head tied to `wte` exactly as GPT-2 has it. The weights travel through
`gpt2_jax.weights.huggingface`, so a test against this reference also checks our mapping to and from HF state dicts.

    params = random_params(config, seed=0)                    # every weight matters (see its docstring)
    model = hf_model_from_params(params, config)
    logits_BTV = hf_logits(model, tokens_BT)                   # numpy float32; optional attention mask
    loss = hf_loss(model, tokens_BT)                           # mean next-token cross-entropy, nats
    loss, grads = hf_loss_and_grads(model, tokens_BT, config)  # grads: a pytree shaped like our params

torch and transformers are test-only dependencies: import this module only from tests.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch
import transformers

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.weights.huggingface import params_from_hf_state_dict, params_to_hf_state_dict


def random_params(config: GPT2Config, seed: int = 0) -> dict[str, Any]:
    """Random float32 params (jax arrays) in which every entry matters, unlike GPT-2's init.

    GPT-2's init leaves biases at 0 and layer-norm gains at 1, and its small weights make attention nearly
    uniform, so a swapped bias, a wrong softmax scale or a leaky mask could hide below a 1e-4 tolerance. Here
    biases and layer-norm params are random, and weights are scaled by 1/sqrt(fan_in) so activations and
    attention logits are of order 1 and the output logits of order a few units.
    """
    rng = np.random.default_rng(seed)
    d = config.n_embd

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = str(path[-1].key)
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "g":
            return jax.numpy.asarray(1.0 + 0.1 * noise)
        if name == "b":
            return jax.numpy.asarray(0.1 * noise)
        std = {"wte": 2.0 / d**0.5, "wpe": 1.0 / d**0.5}.get(name) or 1.0 / leaf.shape[-2] ** 0.5
        return jax.numpy.asarray(std * noise)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def hf_config(config: GPT2Config) -> transformers.GPT2Config:
    """The transformers config of a GPT-2 with our architecture: no dropout, eager attention, tied head."""
    hf = config.to_hf_config()
    if config.n_vocab <= 50256:  # toy vocabularies have no <|endoftext|>; keep transformers from warning
        hf.update(bos_token_id=None, eos_token_id=None)
    return transformers.GPT2Config(**hf, summary_first_dropout=0.0, attn_implementation="eager")


def hf_model_from_params(params: Any, config: GPT2Config) -> transformers.GPT2LMHeadModel:
    """A float32, eval-mode `GPT2LMHeadModel` on the CPU holding exactly `params` (head tied to `wte`)."""
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params_to_hf_state_dict(params).items()}
    model = _empty_hf_model(config)
    missing, unexpected = model.transformer.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced wte: tie the head again
    if unexpected or missing or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise AssertionError(f"HF model and our params disagree: missing {missing}, unexpected {unexpected}")
    return model.to(torch.float32).eval()


def _empty_hf_model(config: GPT2Config) -> transformers.GPT2LMHeadModel:
    """Built on the meta device so transformers does not spend seconds drawing random weights we overwrite."""
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(hf_config(config))
    if any(b.is_meta for b in model.buffers()):  # older transformers keep the causal mask as a buffer: build it
        model = transformers.GPT2LMHeadModel(hf_config(config))
    return model


def hf_position_ids(attention_mask_BT: Any) -> np.ndarray:
    """Positions counted over real tokens only (as HF `generate` does for padded batches); pads get 0."""
    mask = np.asarray(attention_mask_BT, dtype=np.int64)
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(model: transformers.GPT2LMHeadModel, tokens_BT: Any, attention_mask_BT: Any = None) -> np.ndarray:
    """Logits `[B, T, V]` as float32 numpy. With a mask (True/1 = real token) the positions skip the padding."""
    kwargs: dict[str, torch.Tensor] = {}
    if attention_mask_BT is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask_BT, dtype=np.int64))
        kwargs["position_ids"] = torch.from_numpy(hf_position_ids(attention_mask_BT))
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens_BT, dtype=np.int64)), use_cache=False, **kwargs)
    return out.logits.float().numpy()


def hf_loss(model: transformers.GPT2LMHeadModel, tokens_BT: Any) -> float:
    """Mean next-token cross-entropy (nats) over `tokens_BT`: HF's loss with labels=input_ids, no gradient."""
    tokens = torch.from_numpy(np.asarray(tokens_BT, dtype=np.int64))
    with torch.no_grad():
        return float(model(tokens, labels=tokens, use_cache=False).loss)


def hf_loss_and_grads(
    model: transformers.GPT2LMHeadModel, tokens_BT: Any, config: GPT2Config
) -> tuple[float, dict[str, Any]]:
    """Mean next-token cross-entropy over `tokens_BT` and its gradient w.r.t. every parameter.

    The grads come back as a pytree shaped like our params (float32 numpy). The head is the same tensor as
    `wte` in HF, so torch already accumulates the head's gradient into `wte`'s, as ours does.
    """
    model.zero_grad(set_to_none=True)
    tokens = torch.from_numpy(np.asarray(tokens_BT, dtype=np.int64))
    loss = model(tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    grads = {
        name.removeprefix("transformer."): p.grad.detach().numpy().copy()
        for name, p in model.named_parameters()
        if name != "lm_head.weight"  # tied: the same tensor as wte (named_parameters lists it once anyway)
    }
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), params_from_hf_state_dict(grads, config, source="HF gradients")
