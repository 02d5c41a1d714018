"""Stage planning and sharded loading, against the unsharded Hugging Face models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydapt.errors import UserError
from raydapt.models.shard import load_shard
from raydapt.models.sharding import plan_stages
from tests.conftest import FAMILIES


def test_plan_balances_work():
    # Extras (first) and head (last) cost as much as two blocks: the ends get fewer blocks.
    assert plan_stages([10] * 8, 3, first_extra=20, last_extra=20) == [range(0, 2), range(2, 6), range(6, 8)]
    assert plan_stages([10] * 4, 4) == [range(i, i + 1) for i in range(4)]
    assert plan_stages([1, 1, 1, 9], 2) == [range(0, 3), range(3, 4)]


def test_stage_plan_counts_the_head_as_work_and_the_embeddings_as_none():
    # The default large LM: 4 blocks of 655,872 multiply-adds per token, a tied 4096 x 256 head
    # (1,048,576 + the final norm). With the embedding table counted as work the split was 2/2;
    # as a lookup, 3 blocks (1.97M) against 1 block + head (1.70M) is the more even split.
    from raydapt.defaults import default_model_dir
    from raydapt.models.shard import stage_plan
    assert stage_plan(default_model_dir("large"), 2).ranges == [range(0, 3), range(3, 4)]


def test_plan_rejects_more_stages_than_layers():
    with pytest.raises(UserError, match="the model has 4 layers"):
        plan_stages([1] * 4, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_logits_equal_hugging_face(tiny_checkpoints, family):
    directory, model = tiny_checkpoints[family]
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 128, (3, 17)))
    with torch.no_grad():
        reference = model(ids).logits
    for n_stages in (1, 2, 3, 4):
        shards = [load_shard(directory, n_stages, s) for s in range(n_stages)]
        with torch.no_grad():
            hidden = shards[0].embed(ids)
            for shard in shards:
                hidden = shard.run_blocks(hidden)
            logits = shards[-1].logits(hidden)
        assert torch.allclose(logits, reference, atol=1e-5), (family, n_stages)


def test_stage_holds_only_its_blocks(tiny_checkpoints):
    directory, model = tiny_checkpoints["llama"]
    total_blocks = sum(p.numel() for p in model.model.layers.parameters())
    for n_stages in (2, 4):
        shards = [load_shard(directory, n_stages, s) for s in range(n_stages)]
        for shard in shards:
            held = sum(p.numel() for p in shard.blocks.parameters())
            assert held == total_blocks // n_stages
        # Embeddings live only on the first stage, the head only on the last.
        assert [hasattr(s.owned, "model__embed_tokens") for s in shards] == [True] + [False] * (n_stages - 1)
        assert [hasattr(s.owned, "lm_head") for s in shards] == [False] * (n_stages - 1) + [True]
