"""`lite-srpo eval` on tiny models: known accuracy from a file, protocols named, merged export scores the same."""
import dataclasses
import json

import pytest
import torch
from PIL import Image

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict, dump_yaml
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task, write_jsonl
from lite_srpo.errors import ConfigError, DataError, LiteSrpoError
from lite_srpo.eval.eval_cli import eval_main, format_table, summarize
from lite_srpo.model.export.cli import export_main
from lite_srpo.model.export.source import resolve_checkpoint
from lite_srpo.model.policy import load_policy
from lite_srpo.rewards.builtin import extract_answer
from lite_srpo.rl.rollout import encode_prompt, generate
from lite_srpo.run.checkpoint import save_checkpoint

MAX_NEW = 6


@pytest.fixture(scope="module")
def run_dir(tiny_qwen, tmp_path_factory):
    """A 4-bit run with one checkpoint whose LoRA weights are seeded random (a non-trivial adapter)."""
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path_factory.mktemp("runs"), reward__weights={"accuracy": 1.0},
                                       rollout__max_new_tokens=MAX_NEW))
    policy = load_policy(cfg.model, cfg.lora)
    gen = torch.Generator().manual_seed(1)
    for name, p in policy.model.named_parameters():
        if "lora_" in name:
            p.data += 0.1 * torch.randn(p.shape, generator=gen)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "recipe.yaml").write_text(dump_yaml(cfg))
    save_checkpoint(cfg.run_dir, 1, policy.model, torch.optim.AdamW(policy.trainable_parameters()), None,
                    dump_yaml(cfg))
    return cfg.run_dir


@pytest.fixture(scope="module")
def known_half(run_dir, tmp_path_factory):
    """4 samples whose gold answers are the model's own greedy last lines for samples 0 and 2: accuracy 2/4.

    The greedy texts come from `rollout.generate` on the checkpoint loaded with `load_policy`, not from
    the eval command, so the command's loading, prompting, grading and counting are all checked.
    """
    src = resolve_checkpoint(run_dir)
    policy = load_policy(dataclasses.replace(src.cfg.model, gradient_checkpointing=False), src.cfg.lora,
                         adapter_path=str(src.adapter_dir), trainable=False)
    policy.model.eval()
    samples = make_task("count_shapes", "test", 4, seed=7)
    fmt = ResponseFormat()
    prompts = [encode_prompt(policy, s, "structured", fmt) for s in samples]
    texts = generate(policy, prompts, group_size=1, max_new_tokens=MAX_NEW, do_sample=False).texts
    answers = [extract_answer(t, "last_line") for t in texts]
    assert answers[0] and answers[2], f"the tiny model printed an empty last line: {texts}"
    gold = [answers[0], "zzz-not-this", answers[2], "qqq-nor-this"]
    path = tmp_path_factory.mktemp("data") / "known_half.jsonl"
    write_jsonl([dataclasses.replace(s, answer=a) for s, a in zip(samples, gold)], path)
    return path


def test_accuracy_per_dataset_and_overall_from_files(run_dir, known_half, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert eval_main([str(run_dir), "--data", str(known_half), "--data", "count_shapes", "--n", "3",
                      "--answer-fallback", "last_line", "--batch-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    known, task = res["datasets"]["known_half"], res["datasets"]["count_shapes"]
    assert known["accuracy"] == 0.5 and known["n_samples"] == 4 and known["n_responses"] == 4
    assert task["n_samples"] == 3
    # overall weights every response once: (0.5 * 4 + acc_task * 3) / 7
    assert res["overall"]["accuracy"] == pytest.approx((0.5 * 4 + task["accuracy"] * 3) / 7)
    assert res["overall"]["macro_accuracy"] == pytest.approx((0.5 + task["accuracy"]) / 2)
    assert res["protocol"] == "greedy" and res["protocol_spec"]["temperature"] is None
    assert 1 <= known["mean_length"] <= MAX_NEW and 0 <= known["format_rate"] <= 1
    assert res["model"]["kind"] == "checkpoint" and res["model"]["step"] == 1
    printed = capsys.readouterr().out
    assert "protocol greedy" in printed and "known_half" in printed and "overall" in printed


def test_avg_at_k_names_its_protocol_and_samples_k_per_prompt(run_dir, tmp_path, capsys):
    out = tmp_path / "avg.json"
    assert eval_main([str(run_dir), "--data", "gauge", "--n", "2", "--protocol", "avg@3", "--temperature", "0.7",
                      "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"] == "avg@3 (T=0.7)" and res["protocol_spec"] == {"name": "avg@k", "k": 3, "temperature": 0.7}
    assert res["datasets"]["gauge"]["n_samples"] == 2 and res["datasets"]["gauge"]["n_responses"] == 6
    assert "avg@3 (T=0.7)" in capsys.readouterr().out


def test_merged_export_scores_like_the_checkpoint(run_dir, known_half, tmp_path):
    merged = tmp_path / "merged"
    assert export_main([str(run_dir), "--mode", "merged", "--out", str(merged)]) == 0
    args = ["--data", str(known_half), "--answer-fallback", "last_line", "--batch-size", "4"]
    assert eval_main([str(merged), *args, "--out", str(tmp_path / "m.json")]) == 0
    assert eval_main([str(run_dir / "checkpoints" / "step_000001"), *args, "--out", str(tmp_path / "c.json")]) == 0
    m, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "mc")
    assert m["model"]["kind"] == "model" and c["model"]["kind"] == "checkpoint"
    for key in ("accuracy", "format_rate", "mean_length", "n_responses"):
        assert m["datasets"]["known_half"][key] == c["datasets"]["known_half"][key], key
    assert m["datasets"]["known_half"]["accuracy"] == 0.5
    assert m["settings"]["template"] == "structured"  # read from the recipe.yaml the export ships


def test_benchmark_file_and_default_held_out_split(run_dir, tmp_path):
    rows = []
    for i in range(3):
        Image.new("RGB", (56, 56), (40 * i, 90, 200)).save(tmp_path / f"img{i}.png")
        rows.append({"pid": str(i), "question": f"What is shown {i}?", "image": f"img{i}.png",
                     "choices": ["red", "blue"], "answer": "blue", "question_type": "multi_choice",
                     "answer_type": "text"})
    bench = tmp_path / "mathvista_mini.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "b.json"
    assert eval_main([str(run_dir), "--data", str(bench), "--limit", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["datasets"]["mathvista_mini"]["n_samples"] == 2

    assert eval_main([str(run_dir)]) == 0  # no --data: the run's held-out split, JSON into the run
    res = json.loads((run_dir / "eval" / "step_000001-greedy.json").read_text())
    assert list(res["datasets"]) == ["held-out (count_shapes)"] and res["overall"]["n_samples"] == 4


def test_bad_input_is_a_clear_error(run_dir, tiny_qwen, tmp_path):
    with pytest.raises(ConfigError, match="--protocol"):
        eval_main([str(run_dir), "--protocol", "best@3"])
    with pytest.raises(ConfigError, match="--temperature"):
        eval_main([str(run_dir), "--protocol", "avg@2", "--temperature", "0"])
    with pytest.raises(DataError, match="no such file"):
        eval_main([str(run_dir), "--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="--data is required"):
        eval_main([str(tiny_qwen)])
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(LiteSrpoError, match="no checkpoint"):
        eval_main([str(empty), "--data", "gauge"])


def test_summarize_weights_by_responses():
    per = {"a": {"accuracy": 0.5, "format_rate": 1.0, "mean_length": 10.0, "n_samples": 2, "n_responses": 4},
           "b": {"accuracy": 1.0, "format_rate": 0.0, "mean_length": 4.0, "n_samples": 2, "n_responses": 2}}
    s = summarize(per)
    assert s["accuracy"] == pytest.approx(4 / 6)  # (0.5*4 + 1.0*2) / 6
    assert s["format_rate"] == pytest.approx(4 / 6)  # (1*4 + 0*2) / 6
    assert s["mean_length"] == pytest.approx(8.0)  # (10*4 + 4*2) / 6 = 48 / 6
    assert s["macro_accuracy"] == 0.75 and s["n_samples"] == 4 and s["n_responses"] == 6
    table = format_table({"model": {"source": "m"}, "protocol": "greedy", "datasets": per, "overall": s,
                          "settings": {"max_new_tokens": 8, "template": "plain"}})
    assert "macro average" in table and "0.667" in table


def test_hub_data_goes_through_the_training_loader(run_dir, known_half, tmp_path, monkeypatch):
    """`--data hf://ORG/NAME[:CONFIG][@SPLIT]`: a local dataset repository stands in for the hub, as in
    tests/data/test_hub_data.py (load_dataset on the folder, offline). The known-half rows under renamed
    columns score exactly as the file does, mapped by --columns or by the recipe's data.columns."""
    import io
    import shutil

    import datasets
    import yaml

    from lite_srpo.data import hub as hub_data

    rows = [json.loads(line) for line in known_half.read_text().splitlines()]
    pngs = []
    for r in rows:
        buf = io.BytesIO()
        Image.open(known_half.parent / r["image"]).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
                                    "    path: data/test-*.parquet\n---\n")
    features = datasets.Features({"pic": datasets.Image(), "query": datasets.Value("string"),
                                  "gold": datasets.Value("string")})
    datasets.Dataset.from_dict({"pic": pngs, "query": [r["question"] for r in rows],
                                "gold": [r["answer"] for r in rows]},
                               features=features).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    calls, load_dataset_folder = [], hub_data.load_hub_table

    def local_hub(repo_id, config, split, cache_dir=None):
        calls.append((repo_id, config, split))
        return load_dataset_folder(str(repo), config, split, cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(hub_data, "load_hub_table", local_hub)
    args = ["--answer-fallback", "last_line", "--batch-size", "4"]
    with pytest.raises(DataError, match=r"no image column .*columns: pic, query, gold"):
        eval_main([str(run_dir), "--data", "hf://org/name", *args])
    out = tmp_path / "flag.json"
    assert eval_main([str(run_dir), "--data", "hf://org/name", "--columns", "image=pic,question=query,answer=gold",
                      *args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())["datasets"]
    assert list(res) == ["org/name@test"] and calls[-1] == ("org/name", None, "test")
    assert res["org/name@test"]["accuracy"] == 0.5 and res["org/name@test"]["n_samples"] == 4

    mapped = tmp_path / "run_with_columns"  # the same run, its recipe naming the columns as a training recipe would
    shutil.copytree(run_dir, mapped, ignore=shutil.ignore_patterns("eval"))
    for recipe in [mapped / "recipe.yaml", *mapped.glob("checkpoints/*/recipe.yaml")]:
        data = yaml.safe_load(recipe.read_text())
        data["data"]["columns"] = {"image": "pic", "question": "query", "answer": "gold"}
        recipe.write_text(yaml.safe_dump(data))
    assert eval_main([str(mapped), "--data", "hf://org/name:default@test", "--limit", "3", *args]) == 0
    res = json.loads((mapped / "eval" / "step_000001-greedy.json").read_text())["datasets"]
    assert calls[-1] == ("org/name", "default", "test")
    hub = res["org/name:default@test"]
    assert hub["n_samples"] == 3 and hub["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="--columns 'picture=pic'"):
        eval_main([str(run_dir), "--data", "hf://org/name", "--columns", "picture=pic"])
    with pytest.raises(ConfigError, match="--benchmark mathvista applies to files"):
        eval_main([str(run_dir), "--data", "hf://org/name", "--benchmark", "mathvista"])
    with pytest.raises(DataError, match=r"expected hf://ORG/NAME\[:CONFIG\]\[@SPLIT\]"):
        eval_main([str(run_dir), "--data", "hf://just-a-name"])
