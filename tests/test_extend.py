"""Extending the frozen LM to a new language: the gettext recipe, the batch plan, and the Ray Train
job (2 workers) whose loss falls, whose backbone stays byte-identical and whose killed worker changes
no final number."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from raydapt.data import make_newlang as recipe
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.extend.data import step_rows


def write_mo(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A GNU .mo file (little-endian, no hash table) holding `pairs` (msgid, msgstr) and a header."""
    pairs = [("", "Content-Type: text/plain; charset=UTF-8\n")] + sorted(pairs)
    ids = [k.encode() for k, _ in pairs]
    strs = [v.encode() for _, v in pairs]
    n = len(pairs)
    start = 7 * 4 + 16 * n
    blob, id_table, str_table = b"", [], []
    for s in ids:
        id_table.append((len(s), start + len(blob)))
        blob += s + b"\x00"
    for s in strs:
        str_table.append((len(s), start + len(blob)))
        blob += s + b"\x00"
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in id_table + str_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + tables + blob)
    return path


FRENCH = [(f"message {i}", f"Ceci est le message numéro {i}, traduit en français.") for i in range(200)]


def test_gettext_recipe_reads_catalogs_and_splits_by_hash(tmp_path):
    where = tmp_path / "locale" / "fr" / "LC_MESSAGES"
    write_mo(where / "a.mo", FRENCH[:120] + [("short", "Oui")])
    write_mo(where / "b.mo", FRENCH[100:] + [("plural", "un fichier supprimé\x00%d fichiers supprimés")])
    assert "Ceci est le message numéro 7, traduit en français." in recipe.read_mo(where / "a.mo")
    corpus = recipe.new_language_corpus("fr", str(tmp_path / "locale"))
    everything = sum(corpus.splits.values(), [])
    assert len(everything) == len(set(everything)) == 202  # the 20 shared messages once; "Oui" too short
    assert "%d fichiers supprimés" in everything  # plural forms are messages of their own
    assert all(recipe.split_of(t) == s for s, texts in corpus.splits.items() for t in texts)
    assert 0 < len(corpus.splits["test"]) < 30 and 0 < len(corpus.splits["dev"]) < 30
    again = recipe.new_language_corpus("fr", str(tmp_path / "locale"))
    assert again.splits == corpus.splits and again.source["sha256"] == corpus.source["sha256"]
    with pytest.raises(UserError, match="no gettext catalogs .* give a new-language corpus with --new-domain"):
        recipe.new_language_corpus("de", str(tmp_path / "locale"))


def test_user_corpora_and_their_errors(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("bonjour le monde")
    (tmp_path / "d" / "b.txt").write_text("au revoir")
    assert recipe.read_user_texts(str(tmp_path / "d"), "new-domain") == ["bonjour le monde", "au revoir"]
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"text": "un"}) + "\n" + json.dumps({"text": "deux"}) + "\n")
    assert recipe.read_user_texts(str(rows), "original-mix") == ["un", "deux"]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="--new-domain: .* holds no text"):
        recipe.read_user_texts(str(tmp_path / "empty.txt"), "new-domain")
    with pytest.raises(UserError, match="--original-eval: .* does not exist"):
        recipe.read_user_texts(str(tmp_path / "nope"), "original-eval")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="line 1: needs a \"text\""):
        recipe.read_user_texts(str(bad), "new-domain")


def test_the_default_recipe_on_this_machine_is_french_and_the_sources_differ():
    if not (Path(recipe.DEFAULT_LOCALE_DIR) / "fr" / "LC_MESSAGES").is_dir():
        pytest.skip("no French gettext catalogs on this machine")
    corpus = recipe.new_language_corpus()
    assert corpus.source["catalogs"] >= 1 and len(corpus.splits["train"]) > 10 * len(corpus.splits["test"]) > 0
    text = " ".join(corpus.splits["train"][:2000])
    assert sum(text.count(w) for w in (" le ", " la ", " de ", " des ")) > 500
    evaluation = recipe.original_eval_texts()
    assert evaluation and not set(evaluation) & set(recipe.original_mix_texts()[:50])


def test_batch_plan_depends_on_seed_and_step_only():
    original = np.array([False] * 90 + [True] * 10)
    plan = step_rows(original, 16, 200, 0.1, seed=3)
    assert plan.shape == (200, 16) and np.array_equal(plan, step_rows(original, 16, 200, 0.1, seed=3))
    assert np.array_equal(plan[:50], step_rows(original, 16, 50, 0.1, seed=3))  # row t needs only (seed, t)
    assert 0.07 < original[plan].mean() < 0.13
    assert not original[step_rows(original, 16, 20, 0.0, seed=3)].any()


def _corpora(tmp_path: Path) -> list[str]:
    """Small user corpora (fast to build): French sentences, two different Python sources."""
    fr = tmp_path / "fr.jsonl"
    fr.write_text("".join(json.dumps({"text": f"Le fichier {i} est introuvable ; vérifiez le chemin."}) + "\n"
                          for i in range(400)))
    stdlib = Path(recipe.__file__).parents[1]
    return ["--new-domain", str(fr), "--original-mix", str(stdlib / "adapters"), "--original-eval",
            str(stdlib / "bbt")]


@pytest.mark.cluster
@pytest.mark.slow
def test_two_worker_run_learns_keeps_the_backbone_and_survives_a_killed_worker(ray_cluster, tmp_path):
    from actors.runner import RayRuntime
    from raydapt.config import parse_args
    from raydapt.extend.config import ExtendConfig
    from raydapt.extend.job import run_extend_job

    weights = Path(default_model_dir("large")) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    common = ["--steps", "6", "--batch", "4", "--context", "32", "--eval-blocks", "4", "--checkpoint-every", "2",
              "--lr", "0.01", "--original-fraction", "0.25", "--seed", "5", *_corpora(tmp_path)]
    results = {}
    for name, extra in (("clean", []), ("killed", ["--fault-injection", "kill-worker:after-steps=3"])):
        cfg = parse_args(ExtendConfig, [*common, *extra, "--output-dir", str(tmp_path / name)])
        results[name] = run_extend_job(cfg, RayRuntime)  # the factory: called once inputs are checked
    clean, killed = results["clean"], results["killed"]
    assert killed["worker_failures_injected"] == 1 and clean["worker_failures_injected"] == 0
    log = [json.loads(line) for line in (tmp_path / "clean" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["lm"] < log[0]["lm"]  # it learns the new domain
    assert any(r["aux"] > 0 for r in log)  # the l1 term saw original-domain tokens
    assert clean["new_loss"] < clean["backbone_losses"]["new_test"]
    for key in ("new_loss", "original_loss", "losses", "gate_mean", "final_train_loss"):
        assert killed[key] == clean[key], key
    assert (tmp_path / "clean" / "adapters.safetensors").read_bytes() == \
        (tmp_path / "killed" / "adapters.safetensors").read_bytes()
    assert (tmp_path / "clean" / "log.jsonl").read_bytes() == (tmp_path / "killed" / "log.jsonl").read_bytes()
    assert {p.name for p in (tmp_path / "clean").iterdir()} >= {"config.json", "result.json", "log.jsonl",
                                                                 "adapters.safetensors", "curve.png"}
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # the backbone's bytes, unchanged
    assert 0.15 < clean["extra_fraction"] < 0.25
    # --resume on a finished run keeps it (no training, same result), whatever neutral field changed.
    again = parse_args(ExtendConfig, [*common, "--resume", "--fault-injection", "kill-worker:after-steps=1",
                                      "--output-dir", str(tmp_path / "clean")])
    assert run_extend_job(again, lambda: pytest.fail("a finished run started Ray Train")) == clean


def test_pareto_front_and_sweep_grid(tmp_path):
    from raydapt.extend.config import ExtendConfig
    from raydapt.extend.sweep import pareto_front, plot_tradeoff, sweep_grid

    #           a: front     b: dominated by a  c: front     d: front    e: ties a on x, worse y
    points = [(1.0, 3.0), (1.5, 3.5), (2.0, 2.0), (3.0, 1.0), (1.0, 4.0)]
    assert pareto_front(points) == [0, 2, 3]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other
    cfg = ExtendConfig(sweep_methods="neutral,lora", sweep_lrs="0.001,0.01", output_dir=str(tmp_path / "s"))
    grid = sweep_grid(cfg)
    assert [(g.method, g.lr) for g in grid] == [("neutral", 0.001), ("neutral", 0.01), ("lora", 0.001), ("lora", 0.01)]
    assert grid[1].output_dir == str(tmp_path / "s" / "neutral-lr0.01") and not grid[1].is_sweep
    with pytest.raises(UserError, match="--sweep-lrs: .* repeats"):
        ExtendConfig(sweep_lrs="0.1,0.1")
    runs = [{"method": m, "lr": lr, "original_loss": x, "new_loss": y} for (m, lr), (x, y) in
            zip([("neutral", 1e-3), ("neutral", 1e-2), ("lora", 1e-3), ("lora", 1e-2), ("full", 1e-3)], points)]
    plot_tradeoff(tmp_path / "t.png", {"runs": runs, "backbone": {"original_loss": 0.9, "new_loss": 5.0}})
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_run_sweep_writes_the_tradeoff_and_keeps_finished_runs_on_resume(tmp_path):
    from raydapt.extend.config import ExtendConfig
    from raydapt.extend.sweep import run_sweep
    from raydapt.outputs import write_json

    calls = []

    def fake_run(sub, make_runtime):  # (original, new) losses from the learning rate: more lr, more of both
        calls.append((sub.method, sub.lr))
        result = {"method": sub.method, "lr": sub.lr, "seed": sub.seed, "original_loss": 1 + sub.lr * (sub.method == "full"),
                  "new_loss": 3 - sub.lr, "gate_mean": {}, "backbone_losses": {"original_eval": 1.0, "new_test": 3.5}}
        Path(sub.output_dir).mkdir(parents=True)
        write_json(Path(sub.output_dir) / "result.json", result)
        return result

    cfg = ExtendConfig(sweep_methods="neutral,full", sweep_lrs="0.5,1", output_dir=str(tmp_path / "s"))
    summary = run_sweep(cfg, None, fake_run)
    assert calls == [("neutral", 0.5), ("neutral", 1.0), ("full", 0.5), ("full", 1.0)]
    assert summary["pareto"] == ["neutral@1"]  # lowest new loss at no forgetting
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["backbone"] == {"original_loss": 1.0, "new_loss": 3.5}
    assert (tmp_path / "s" / "tradeoff.png").exists()
    calls.clear()
    import dataclasses
    assert run_sweep(dataclasses.replace(cfg, resume=True), None, fake_run) == summary and calls == []


def test_help_lists_every_method_and_states_defaults_once():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "jobs" / "extend.py"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    from raydapt.adapters.config import METHODS
    assert all(f"{m}:" in text for m in METHODS) and "--extra-params" in text and "--sweep-lrs" in text
    model = text.split("--model MODEL ", 1)[1].split(" --", 1)[0]
    assert model.count("default") == 1, model


def _saved_run(tmp_path: Path, tiny_checkpoints, method: str) -> tuple[Path, object]:
    """A run dir holding adapters.safetensors as jobs/extend.py writes it (trained tensors perturbed)."""
    import torch

    from raydapt.adapters import AdapterConfig, trainable_state
    from raydapt.extend.job import load_extended
    from raydapt.outputs import save_tensors

    model_dir = str(tiny_checkpoints["llama"][0])
    model, cfg = load_extended(model_dir, AdapterConfig(method=method), None, seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "w_o" in name or method == "full"):
                p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path / method
    run.mkdir()
    save_tensors(run / "adapters.safetensors", {k: v.numpy() for k, v in trainable_state(model).items()},
                 metadata={"adapter_config": cfg.to_json(), "model": model_dir, "method": method, "seed": "2"})
    return run, model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_export_as_a_merged_checkpoint(tmp_path, tiny_checkpoints, method):
    import torch
    from transformers import AutoModelForCausalLM

    from raydapt.extend.export import export_merged

    run, model = _saved_run(tmp_path, tiny_checkpoints, method)
    merged_dir = export_merged(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0) and not torch.equal(
        want, tiny_checkpoints["llama"][1].eval()(input_ids=ids).logits)


def test_adapters_refuse_another_backbone_and_gated_ones_refuse_merging(tmp_path, tiny_checkpoints):
    from raydapt.extend.export import export_merged, load_run

    run, model = _saved_run(tmp_path, tiny_checkpoints, "neutral")
    extended, cfg = load_run(run / "adapters.safetensors")
    assert cfg.method == "neutral" and cfg.hidden > 0
    with pytest.raises(UserError, match="trained on another backbone"):
        load_run(run / "adapters.safetensors", str(tiny_checkpoints["qwen2"][0]))
    with pytest.raises(UserError, match="cannot be merged"):
        export_merged(run, tmp_path / "m")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UserError, match="not an adapters file"):
        load_run(tmp_path / "junk.safetensors")
