"""The black-box oracle: `raydapt score` parity with Hugging Face, prompted scoring through the Ray
pipeline, per-actor memory, and exact accounting with a hard budget."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actors.pipeline import LocalPool, RayPool, local_oracle
from raydapt.serving import PoolSpec
from actors.cli import main as raydapt_main
from raydapt.oracle import Budget, BudgetExceededError, ShardedOracle, Usage
from tests.conftest import FAMILIES

RNG = np.random.default_rng(0)
DOCS = [RNG.integers(0, 128, n).tolist() for n in (5, 17, 2, 40, 9, 23)]


def hf_token_logprobs(model, doc: list[int]) -> np.ndarray:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([doc])).logits[0], -1)
    return logp[torch.arange(len(doc) - 1), torch.tensor(doc[1:])].numpy()


def score(tmp_path, directory, stages, extra=()):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in DOCS))
    out = tmp_path / f"out-{stages}.parquet"
    raydapt_main(["score", "--model", str(directory), "--stages", str(stages), "--input", str(corpus),
                  "--output", str(out), "--micro-batch", "4", *extra])
    return pq.read_table(out).to_pandas()


def check_parity(table, model):
    assert len(table) == sum(len(d) - 1 for d in DOCS)
    for doc_index, doc in enumerate(DOCS):
        rows = table[table.doc == doc_index].sort_values("pos")
        assert rows.pos.tolist() == list(range(1, len(doc)))
        assert rows.token_id.tolist() == doc[1:]
        np.testing.assert_allclose(rows.logprob.to_numpy(), hf_token_logprobs(model, doc), atol=1e-4)
        assert (rows.entropy > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_score_in_process_matches_hugging_face(tmp_path, tiny_checkpoints, family):
    directory, model = tiny_checkpoints[family]
    for stages in (1, 2, 3, 4):
        check_parity(score(tmp_path, directory, stages, ["--local", "--top-k", "3"]), model)


# On Ray, one family per position scheme: GPT-2's learned positions (added once, on the first stage)
# and Llama's rotary ones (in every block, with grouped keys and a tied head). Every family at every
# split S = 1..4 is checked against Hugging Face in process above, through the same stage code; what
# the actors add (arrays through the object store between stage processes, micro-batch i on replica
# i mod R) depends on the shape, not on the family. So the shape with most to get wrong, 3 stages
# (one in the middle, neither first nor last) x 2 replicas, runs once, on Llama, and GPT-2 crosses
# one stage boundary on 2 x 1. Every actor is a process that imports torch (~10 s of CPU here):
# 8 of them, where all five families at 3 x 2 were 30.
RAY_SHAPES = [("gpt2", 2, 1), ("llama", 3, 2)]


@pytest.mark.cluster
@pytest.mark.parametrize("family,stages,replicas", RAY_SHAPES)
def test_score_on_ray_matches_hugging_face(tmp_path, tiny_checkpoints, ray_cluster, family, stages, replicas):
    directory, model = tiny_checkpoints[family]
    # The real actors, opened by `raydapt score` itself from its flags.
    table = score(tmp_path, directory, stages, ["--top-k", "3", "--replicas", str(replicas)])
    check_parity(table, model)
    top = np.stack(table.topk_logprobs.to_numpy())
    assert top.shape == (len(table), 3) and (np.diff(top, axis=1) <= 0).all()


def prompted_inputs():
    lengths = np.array([12, 7, 15, 9, 11])
    ids = np.zeros((5, 15), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = RNG.integers(0, 128, n)
    return ids, lengths


def test_add_mode_matches_hugging_face_inputs_embeds(tiny_checkpoints):
    directory, model = tiny_checkpoints["gpt2"]
    ids, lengths = prompted_inputs()
    prompts = RNG.normal(0, 0.5, (3, 4, 32)).astype(np.float32)
    got = local_oracle(directory, micro_batch_size=4).label_logits(ids, lengths, [5, 9], prompts, offset=1)
    for p in range(3):
        for n in range(5):
            x = model.transformer.wte(torch.from_numpy(ids[n: n + 1, : lengths[n]])).detach().clone()
            x[0, 1:5] += torch.from_numpy(prompts[p])
            with torch.no_grad():
                logits = model(inputs_embeds=x).logits[0, lengths[n] - 1, [5, 9]]
            np.testing.assert_allclose(got[p, n], logits.numpy(), atol=1e-4)


@pytest.mark.cluster
class TestOnePoolOfStageActors:
    """One Ray pool, Llama in 4 stages x 2 replicas, serves every test in this class: none of them
    injects a fault or changes a weight (black-box stages run under inference mode), so sharing the
    8 actor processes proves what a pool per test did, with half the processes (a 2 x 2 pool per
    prompt mode and a 4 x 1 pool for the sizes were 16), and more: deep prompts split over 4 stages,
    sizes checked on both replicas. The pool is closed when the class ends, before any other test
    opens one."""

    @pytest.fixture(scope="class")
    def pool(self, tiny_checkpoints, ray_cluster):
        directory, _ = tiny_checkpoints["llama"]
        # Half a logical CPU per stage: 8 stages fit the test cluster with room to spare (one torch
        # thread each whatever the share, so the bits are those of cpus_per_stage = 1).
        pool = RayPool(PoolSpec(str(directory), stages=4, replicas=2, cpus_per_stage=0.5))
        yield pool
        pool.shutdown()

    @pytest.mark.parametrize("mode", ["add", "cat", "deep"])
    def test_prompted_scoring_through_pipeline_equals_in_process(self, tiny_checkpoints, pool, mode):
        # Deep prompts: each of the 4 stages takes its own block's prompt; 6 prompts x 5 rows in
        # micro-batches of 4 go to both replicas.
        directory, _ = tiny_checkpoints["llama"]
        ids, lengths = prompted_inputs()
        shape = (6, 4, 3, 32) if mode == "deep" else (6, 3, 32)
        prompts = RNG.normal(0, 0.5, shape).astype(np.float32)
        expected = local_oracle(directory, micro_batch_size=4).label_logits(ids, lengths, [1, 2, 3], prompts, mode)
        got = ShardedOracle(pool, micro_batch_size=4).label_logits(ids, lengths, [1, 2, 3], prompts, mode)
        assert got.shape == (6, 5, 3)
        np.testing.assert_allclose(got, expected, atol=1e-4)

    def test_each_stage_actor_holds_a_quarter_of_the_blocks(self, tiny_checkpoints, pool):
        _, model = tiny_checkpoints["llama"]
        total = sum(p.numel() for p in model.model.layers.parameters())
        replicas = pool.describe()
        assert len(replicas) == 2
        for stages in replicas:
            assert [s["layers"] for s in stages] == [[0, 1], [1, 2], [2, 3], [3, 4]]
            assert [s["block_params"] for s in stages] == [total // 4] * 4
            assert max(s["params"] for s in stages) < sum(p.numel() for p in model.parameters()) / 2
        # Eight processes, none with the whole model: no two stages, of one replica or of two, share one.
        assert len({s["pid"] for stages in replicas for s in stages}) == 8


def test_accounting_is_exact_and_budget_refuses(tiny_checkpoints):
    directory, _ = tiny_checkpoints["qwen2"]
    ids, lengths = prompted_inputs()
    oracle = ShardedOracle(LocalPool(PoolSpec(str(directory))), 4, Budget(calls=10))
    prompts = np.zeros((4, 2, 32), np.float32)
    oracle.label_logits(ids, lengths, [1, 2], prompts)
    assert oracle.usage == Usage(calls=4, examples=20, tokens=4 * int(lengths.sum()), requests=1)
    oracle.label_logits(ids, lengths, [1, 2], prompts, mode="cat")
    assert oracle.usage.tokens == 4 * int(lengths.sum()) + 4 * int((lengths + 2).sum())
    with pytest.raises(BudgetExceededError, match=r"needs 4 calls, 8 of 10 are used \(2 left\)"):
        oracle.label_logits(ids, lengths, [1, 2], prompts)
    assert oracle.usage.calls == 8  # the refused request is not charged
    oracle.label_logits(ids, lengths, [1, 2], prompts[:2])
    assert oracle.usage.calls == 10
    with pytest.raises(BudgetExceededError, match=r"needs 1 calls, 10 of 10 are used \(0 left\)"):
        oracle.token_logprobs(ids, lengths)


def _served_by(pool) -> list[int]:
    """Count, per replica, the micro-batches its first stage ran."""
    counts = [0] * pool.n_replicas
    for r, chain in enumerate(pool.replicas):
        forward = chain[0].forward

        def counted(*args, r=r, forward=forward):
            counts[r] += 1
            return forward(*args)
        chain[0].forward = counted
    return counts


def test_results_do_not_depend_on_replicas_or_stages(tiny_checkpoints):
    directory, _ = tiny_checkpoints["llama"]
    ids, lengths = prompted_inputs()
    prompts = RNG.normal(0, 0.5, (7, 3, 32)).astype(np.float32)
    runs = []
    for s, r in ((1, 1), (2, 3), (4, 2)):
        pool = LocalPool(PoolSpec(str(directory), stages=s, replicas=r))
        # Separate replicas: no stage object and no weight storage is shared between two of them.
        weights = [{p.data_ptr() for stage in chain for p in stage.shard.parameters()} for chain in pool.replicas]
        assert all(not (weights[i] & weights[j]) for i in range(r) for j in range(i + 1, r))
        served = _served_by(pool)
        runs.append(ShardedOracle(pool, 4).label_logits(ids, lengths, [1, 2], prompts))
        assert all(n > 0 for n in served), served  # every replica answered part of the population
    # Bitwise, as the README states (not allclose).
    assert all(runs[0].tobytes() == other.tobytes() for other in runs[1:])


def test_a_replica_answers_from_its_own_weights(tiny_checkpoints):
    # Perturb replica 1's copy alone: the rows it served change, replica 0's stay.
    directory, _ = tiny_checkpoints["llama"]
    ids, lengths = prompted_inputs()
    prompts = RNG.normal(0, 0.5, (4, 3, 32)).astype(np.float32)
    clean = ShardedOracle(LocalPool(PoolSpec(str(directory), replicas=2)), 4).label_logits(ids, lengths, [1, 2], prompts)
    pool = LocalPool(PoolSpec(str(directory), replicas=2))
    with torch.no_grad():
        for p in pool.replicas[1][0].shard.parameters():
            p.mul_(1.5)
    got = ShardedOracle(pool, 4).label_logits(ids, lengths, [1, 2], prompts)
    same = (got == clean).all(-1)  # (P, N): one (prompt, example) row each
    assert same.any() and not same.all(), same
