"""transformers' GlmForCausalLM computes the same function (SPEC §2): a second oracle that needs no ../shared."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, tiny_model

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GlmForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no GlmForCausalLM (added in 4.46)",
                allow_module_level=True)
sys.path.insert(0, str(REPO / "tools"))
from glm_peer import glm_peer  # noqa: E402


@pytest.mark.parametrize("rope", [dict(), dict(rope_ratio=16, rope_ratio_mode="divide_positions"),
                                  dict(rope_ratio=500, rope_ratio_mode="scale_base")],
                         ids=["plain", "divide_positions", "scale_base"])
@torch.no_grad()
def test_logits_equal_glm_for_causal_lm(rope):
    model = tiny_model(seed=21, seq_length=4096, **rope)
    try:
        peer = glm_peer(model, attn_implementation="eager")
    except NotImplementedError as err:  # transformers 4.46-4.47: no position interpolation in GlmForCausalLM
        pytest.skip(str(err))
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(10, 512, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = torch.tensor([list(range(9)), [0, 0, 0] + list(range(6))]) + 3000  # large angles matter
    ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    theirs = peer(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    scale = theirs[keep].abs().max()
    assert (ours[keep] - theirs[keep]).abs().max() <= 1e-4 * scale


@torch.no_grad()
def test_prompt_in_pieces_equals_glm_for_causal_lm():
    """The benchmark's chunked prefill (tools/bench.py --prefill-piece): our model fed 16 tokens at a time into one
    cache gives GlmForCausalLM's next-token logits for the whole prompt, and so does the peer fed the same way."""
    from bench import prefill_fn

    model = tiny_model(seed=22, seq_length=4096)
    peer = glm_peer(model)
    ids = torch.randint(10, 512, (1, 45), generator=torch.Generator().manual_seed(22))
    want = peer(input_ids=ids).logits[:, -1]
    for system in (model, peer):
        got = prefill_fn(system, ids, 16)().logits[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
