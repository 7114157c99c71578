"""Hub datasets (`hf://ORG/NAME[:CONFIG][@SPLIT]`): the parser, and `datasets.load_dataset` on a local dataset
repository (Parquet files with HF Image features, a README with configs), read offline through the same
function an `hf://` id goes through; `data.columns`, benchmark detection, every image form, clear errors."""
import io
from pathlib import Path

import datasets
import pytest
from PIL import Image

from lite_srpo.config import DataConfig, config_from_dict
from lite_srpo.config.hub_uri import HubRef, parse_hub_uri
from lite_srpo.data import hub as hub_data
from lite_srpo.data.hub import dataset_samples, load_data_source, load_hub_table
from lite_srpo.data.splits import load_splits
from lite_srpo.errors import ConfigError, DataError

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: geo
  data_files:
  - split: test
    path: geo/test-*.parquet
---
# a tiny local dataset repository
"""


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A dataset repository laid out as on the hub: generic columns under `default`, Geometry3K under `geo`."""
    root = tmp_path_factory.mktemp("hub_repo")
    (root / "README.md").write_text(README)
    (root / "pics").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "pics" / "blue.png")
    generic = datasets.Features({
        "pic": datasets.Image(), "more": datasets.Sequence(datasets.Image()), "raw": datasets.Value("binary"),
        "file": datasets.Value("string"), "query": datasets.Value("string"), "label": datasets.Value("string"),
        "opts": datasets.Sequence(datasets.Value("string")),
    })
    for split, n in (("train", 3), ("test", 2)):
        rows = {
            "pic": [{"bytes": _png((255, 0, 0)), "path": None}] * n,
            "more": [[{"bytes": _png((0, 255, 0)), "path": None}] * 2] * n,
            "raw": [_png((255, 255, 0))] * n,
            "file": ["pics/blue.png"] * n,
            "query": [f"{split} question {i}?" for i in range(n)],
            "label": ["B"] * n,
            "opts": [["one", "two"]] * n,
        }
        (root / "data").mkdir(exist_ok=True)
        datasets.Dataset.from_dict(rows, features=generic).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    geo = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                             "answer": datasets.Value("string")})
    (root / "geo").mkdir()
    datasets.Dataset.from_dict({"images": [[{"bytes": _png((9, 9, 9)), "path": None}]] * 2,
                                "problem": ["<image>Find x.", "<image>Find y."], "answer": ["3", "4"]},
                               features=geo).to_parquet(str(root / "geo" / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


def test_parse_hub_uri():
    assert parse_hub_uri("hf://hiyouga/geometry3k") == HubRef("hiyouga/geometry3k")
    assert parse_hub_uri("hf://AI4Math/MathVerse:testmini") == HubRef("AI4Math/MathVerse", "testmini")
    assert parse_hub_uri("hf://org/name@validation") == HubRef("org/name", None, "validation")
    assert parse_hub_uri("hf://org/na.me-2:cfg_1@test") == HubRef("org/na.me-2", "cfg_1", "test")
    for bad in ("hf://name", "hf://org/name/extra", "hf://org/name@", "hf://org/name:", "hf://org/name:a:b",
                "hf://org/name@a@b", "hf:///name", "org/name"):
        with pytest.raises(DataError, match="hf://ORG/NAME"):
            parse_hub_uri(bad)


def test_bad_hub_uri_is_a_config_error_naming_the_key(tmp_path):
    recipe = {"model": {"path": "m"}, "data": {"train_file": "hf://just-a-name"}, "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"data.train_file: 'hf://just-a-name'"):
        config_from_dict(recipe)
    recipe["data"] = {"train_file": "hf://org/name", "columns": {"picture": "img", "question": ""}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(recipe)
    assert "data.columns.picture: unknown field" in str(err.value) and "data.columns.question: ''" in str(err.value)


def test_load_dataset_path_with_columns_and_every_image_form(repo, cache):
    ds = load_hub_table(str(repo), None, "train", cache_dir=cache)
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 3
    assert isinstance(ds.features["pic"], datasets.Image)
    for image_column, expected in (("pic", [(255, 0, 0)]), ("more", [(0, 255, 0)] * 2), ("raw", [(255, 255, 0)]),
                                   ("file", [(0, 0, 255)])):
        samples = dataset_samples(ds, label="t", source="org/name@train", task="name", root=repo,
                                  columns={"image": image_column, "question": "query", "answer": "label",
                                           "choices": "opts"})
        assert [im.getpixel((0, 0)) for im in samples[0].images] == expected, image_column
    s = samples[1]
    assert (s.question, s.answer, s.choices, s.source, s.task) == ("train question 1?", "B", ["one", "two"],
                                                                    "org/name@train:row 2", "name")


def test_config_and_benchmark_detection(repo, cache):
    ds = load_hub_table(str(repo), "geo", "test", cache_dir=cache)
    samples = dataset_samples(ds, label="t", source="geo@test", task="geo", root=repo, columns={})
    assert [(s.question, s.answer, s.task) for s in samples] == [("Find x.", "3", "geometry3k"),
                                                                 ("Find y.", "4", "geometry3k")]
    assert samples[0].images[0].getpixel((0, 0)) == (9, 9, 9)


def test_missing_columns_and_splits_are_named(repo, cache):
    ds = load_hub_table(str(repo), None, "test", cache_dir=cache)
    with pytest.raises(DataError, match=r"data.columns.question = 'nope' is not a column; columns: pic, more, raw"):
        dataset_samples(ds, label="data.train_file hf://o/n", source="s", task="t", root=repo,
                        columns={"image": "pic", "question": "nope"})
    with pytest.raises(DataError, match=r"no image column \(looked for 'image' / 'images'\); columns: pic, .*"
                                        r"data.columns.image"):
        dataset_samples(ds, label="x", source="s", task="t", root=repo, columns={})
    with pytest.raises(DataError, match=r"@validation: cannot load.*validation"):
        load_hub_table(str(repo), None, "validation", cache_dir=cache)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(DataError, match=r"nobody-xyz/missing-dataset@train: cannot load.*offline"):
        load_data_source("hf://nobody-xyz/missing-dataset", key="data.train_file")


def test_recipe_hub_ids_reach_load_dataset_with_config_and_split(repo, cache, monkeypatch):
    """The hub stands in as the local repository (it cannot be reached here); the rest is the real path."""
    calls = []

    def local_hub(repo_id, config, split, cache_dir=None):
        calls.append((repo_id, config, split))
        return load_hub_table(str(repo), config, split, cache_dir=cache)

    monkeypatch.setattr(hub_data, "load_hub_table", local_hub)
    cfg = DataConfig(train_file="hf://org/name", test_file="hf://org/name:geo", image_root=str(repo),
                     columns={})
    with pytest.raises(DataError, match="no image column"):  # default config: generic names absent
        load_splits(cfg, seed=0)
    cfg.columns = {"image": "more", "question": "query", "answer": "label", "choices": "opts"}
    cfg.test_file = "hf://org/name@test"
    train, test = load_splits(cfg, seed=0)
    assert calls[-2:] == [("org/name", None, "train"), ("org/name", None, "test")]
    assert len(train) == 3 and len(test) == 2 and test[0].question == "test question 0?"
    assert len(train[0].images) == 2


def test_columns_apply_to_local_files_too(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text('{"img": "a.png", "q": "How many?", "gold": 2}\n' * 3)
    train, test = load_splits(DataConfig(train_file=str(tmp_path / "d.jsonl"),
                                         columns={"image": "img", "question": "q", "answer": "gold"}), seed=0)
    assert (len(train), len(test)) == (2, 1) and train[0].answer == "2" and train[0].question == "How many?"
    with pytest.raises(DataError, match=r"data.train_file .*d.jsonl: data.columns.image = 'picture' is not a "
                                        r"column; columns: img, q, gold"):
        load_splits(DataConfig(train_file=str(tmp_path / "d.jsonl"), columns={"image": "picture"}), seed=0)
