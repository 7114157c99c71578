"""The completions table (`train.log_completions_every`) as pure data: which rows, role marks, reward parts,
advantage and the mean weight per role; and its markdown form for TensorBoard."""
import pytest
from PIL import Image

from lite_srpo.config import config_from_dict
from lite_srpo.data.tasks.base import Sample
from lite_srpo.errors import ConfigError
from lite_srpo.rl.completions import completion_rows, mark_roles, pick_rows, role_weight_means
from lite_srpo.run.trackers import markdown_table

from conftest import tiny_recipe


def test_pick_rows_takes_the_first_prompts_and_a_few_samples_each():
    prompt_of = [0] * 5 + [1] * 5 + [2] * 5
    assert pick_rows(prompt_of) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert pick_rows([3, 3, 7, 7, 9], max_prompts=3, max_samples=1) == [0, 2, 4]
    assert pick_rows([1, 0, 1, 0], max_prompts=1) == [0, 2]  # grouped by prompt, in order of appearance
    assert pick_rows([]) == []


def test_mark_roles_wraps_runs_of_perception_and_reasoning():
    text = "<p>red</p><t>so 2</t>x"
    spans = [(0, 3), (3, 6), (6, 10), (10, 13), (13, 17), (17, 21), (21, 22)]
    roles = [0, 1, 0, 0, 2, 0, 0]
    assert mark_roles(text, spans, roles) == "<p>[P]red[/P]</p><t>[R]so 2[/R]</t>x"
    assert mark_roles("abc", [(0, 1), (1, 2), (2, 3)], [2, 2, 2]) == "[R]abc[/R]"
    assert mark_roles("abc", [(0, 1), (1, 3)], [0, 0]) == "abc"
    # adjacent runs of different roles close one and open the other
    assert mark_roles("ab", [(0, 1), (1, 2)], [1, 2]) == "[P]a[/P][R]b[/R]"


def test_role_weight_means():
    assert role_weight_means([1.0, 2.0, 4.0, 1.0], [1, 1, 2, 0]) == {"weight/perception": 1.5, "weight/reasoning": 4.0}
    assert role_weight_means([1.0], [0]) == {"weight/perception": None, "weight/reasoning": None}


def test_completion_rows_assemble_one_row_per_response():
    big = Image.new("RGB", (1000, 500), (10, 20, 30))
    samples = [Sample(images=[big], question="How many?", answer="2"), Sample(images=[], question="Q2", answer="B")]
    rows = completion_rows(prompts=[1, 0, 1], samples=samples, texts=["ab", "cd", "ef"],
                           spans=[[(0, 1), (1, 2)]] * 3, roles=[[1, 2], [0, 0], [2, 2]],
                           rewards=[1.0, 0.0, float("nan")], parts={"accuracy": [1.0, 0.0, 0.0], "format": [1, 0, 1]},
                           advantages=[0.7, -0.7, 0.0], weights=[[1.5, 0.5], [1.0, 1.0], [2.0, 1.0]])
    assert [list(r) for r in rows] == [["prompt", "sample", "image", "question", "answer", "response", "reward",
                                        "reward/accuracy", "reward/format", "advantage", "weight/perception",
                                        "weight/reasoning"]] * 3
    assert [(r["prompt"], r["sample"], r["question"]) for r in rows] == [(0, 0, "Q2"), (1, 0, "How many?"),
                                                                         (0, 1, "Q2")]
    assert [r["response"] for r in rows] == ["[P]a[/P][R]b[/R]", "cd", "[R]ef[/R]"]
    assert rows[0]["image"] is None and rows[1]["image"].size == (256, 128)  # a thumbnail, not the original
    assert big.size == (1000, 500)
    assert rows[2]["reward"] is None and rows[0]["reward/accuracy"] == 1.0 and rows[1]["advantage"] == -0.7
    assert (rows[0]["weight/perception"], rows[0]["weight/reasoning"]) == (1.5, 0.5)
    assert (rows[1]["weight/perception"], rows[2]["weight/reasoning"]) == (None, 1.5)
    no_weights = completion_rows(prompts=[0], samples=samples, texts=["ab"], spans=[[(0, 1), (1, 2)]], roles=None,
                                 rewards=[0.5], parts={}, advantages=[0.0], weights=None)
    assert list(no_weights[0]) == ["prompt", "sample", "image", "question", "answer", "response", "reward", "advantage"]
    assert no_weights[0]["response"] == "ab"


def test_markdown_table_escapes_what_tensorboard_would_render():
    rows = completion_rows(prompts=[0], samples=[Sample(images=[Image.new("RGB", (4, 4))], question="a|b", answer="1")],
                           texts=["<think>x*2_y\nz</think>"], spans=[[(0, 7), (7, 12), (12, 14), (14, 22)]],
                           roles=[[0, 2, 2, 0]], rewards=[0.25], parts={}, advantages=[1.0], weights=None)
    table = markdown_table(rows).splitlines()
    assert table[0] == "| prompt | sample | image | question | answer | response | reward | advantage |"
    assert table[1] == "|---|---|---|---|---|---|---|---|"
    assert table[2] == ("| 0 | 0 | completions/prompt\\_0 | a\\|b | 1 | "
                        "&lt;think&gt;\\[R\\]x\\*2\\_y<br>z\\[/R\\]&lt;/think&gt; | 0.25 | 1 |")


def test_log_completions_every_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"train.log_completions_every: -1 is out of range — needs >= 0"):
        config_from_dict(tiny_recipe("m", tmp_path, train__log_completions_every=-1))
    with pytest.raises(ConfigError, match=r"train.log_completions_every: 2 sends tables to trackers, but "
                                          r"train.report_to is empty"):
        config_from_dict(tiny_recipe("m", tmp_path, train__log_completions_every=2))
    assert config_from_dict(tiny_recipe("m", tmp_path)).train.log_completions_every == 0
