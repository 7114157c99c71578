"""Recipe parsing: presets, overrides, and errors that name the key and what is allowed."""
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lite_srpo.config import ALGORITHMS, RunConfig, config_from_dict, dump_yaml, load_config, parse_override
from lite_srpo.errors import ConfigError

BASE = {"model": {"path": "some/model"}, "data": {"task": "count_shapes"}}
RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def cfg(**sections):
    return config_from_dict({**BASE, **sections})


def test_every_shipped_recipe_validates():
    assert RECIPES, "no recipes found"
    for path in RECIPES:
        c = load_config(path)
        assert c.algorithm.name in ALGORITHMS, path


def test_algorithm_presets_fill_unset_keys_and_recipe_wins():
    dapo = cfg(algorithm={"name": "dapo"})
    assert (dapo.algorithm.agg, dapo.algorithm.clip_high, dapo.algorithm.beta, dapo.algorithm.dynamic_sampling) == ("token", 0.28, 0.0, True)
    dr = cfg(algorithm={"name": "dr_grpo"})
    assert (dr.algorithm.adv_scale, dr.algorithm.agg) == ("none", "dr_grpo")
    grpo = cfg(algorithm={"name": "grpo", "beta": 0.0})
    assert grpo.algorithm.beta == 0.0 and grpo.algorithm.agg == "seq"
    papo = cfg(algorithm={"name": "papo"})
    assert papo.algorithm.corruption.per_response is False and papo.algorithm.clip_high == 0.3
    vppo = cfg(algorithm={"name": "vppo", "corruption": {"patch_size": 16}})
    assert vppo.algorithm.corruption.prob == 0.5 and vppo.algorithm.corruption.patch_size == 16


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        cfg(rollout={"group_sizee": 4})
    assert "rollout.group_sizee" in str(e.value) and "group_size" in str(e.value)


def test_unknown_algorithm_lists_valid():
    with pytest.raises(ConfigError) as e:
        cfg(algorithm={"name": "ppo"})
    assert all(a in str(e.value) for a in ALGORITHMS)


@pytest.mark.parametrize("section,key,value,needle", [
    ("rollout", "group_size", 1, "rollout.group_size"),
    ("optim", "lr", -1e-5, "optim.lr"),
    ("rollout", "temperature", 0, "rollout.temperature"),
    ("algorithm", "agg", "mean", "algorithm.agg"),
    ("train", "steps", "ten", "train.steps"),
])
def test_impossible_values_name_the_key(section, key, value, needle):
    with pytest.raises(ConfigError) as e:
        cfg(**{section: {key: value}})
    assert needle in str(e.value)


def test_srpo_needs_structured_template():
    with pytest.raises(ConfigError, match="structured"):
        cfg(algorithm={"name": "srpo"}, data={"task": "count_shapes", "template": "think"})


def test_overrides_parse_yaml_scalars_and_reject_flags(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    c = load_config(p, ["train.steps=7", "algorithm.srpo.lam=0.3", "algorithm.dual_clip=null"])
    assert c.train.steps == 7 and c.algorithm.srpo.lam == 0.3 and c.algorithm.dual_clip is None
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("--steps=3")


def test_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE) + "optim:\n  lr: 1e-5\n")
    assert load_config(p, ["sft.lr=2e-3"]).optim.lr == 1e-5
    assert load_config(p, ["sft.lr=2e-3"]).sft.lr == 2e-3


def test_yaml_round_trip():
    c = cfg(algorithm={"name": "srpo"})
    again = config_from_dict(yaml.safe_load(dump_yaml(c)))
    assert again == c


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["rollout", "optim", "train", "algorithm", "bogus"]),
                       st.dictionaries(st.text(min_size=1, max_size=12),
                                       st.one_of(st.integers(), st.floats(allow_nan=True), st.text(), st.none(),
                                                 st.booleans()), max_size=3), max_size=3))
def test_parser_only_raises_config_errors(sections):
    """Any other exception fails the test; a ConfigError must say what is wrong, and a recipe with an
    unknown section never validates."""
    try:
        result = config_from_dict({**BASE, **sections})
    except ConfigError as exc:
        assert str(exc).strip()
        return
    assert isinstance(result, RunConfig)
    assert "bogus" not in sections, "an unknown section was accepted"


@pytest.mark.parametrize("override,needle", [
    ({"rollout": {"top_p": 0.99}}, "rollout.top_p"),
    ({"rollout": {"top_k": 50}}, "rollout.top_k"),
    ({"lora": {"dropout": 0.05}}, "lora.dropout"),
    ({"algorithm": {"name": "dapo", "filter_on": "format"}}, "algorithm.filter_on"),
    ({"algorithm": {"name": "dapo", "overlong": "cut"}}, "algorithm.overlong"),
    ({"algorithm": {"name": "srpo", "srpo": {"consistency": "both"}}}, "algorithm.srpo.consistency"),
])
def test_sampling_and_scoring_must_agree_and_new_keys_are_checked(override, needle):
    """Truncated sampling (top-p/top-k) or dropout would make the old log-probs differ from the sampler."""
    from lite_srpo.config import config_from_dict
    from lite_srpo.errors import ConfigError

    data = {"model": {"path": "m"}, "data": {"task": "count_shapes"}, **override}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict(data)


def test_logprob_chunk_defaults_to_auto_and_accepts_whole_numbers(tmp_path):
    assert cfg().train.logprob_chunk == "auto"
    assert cfg(train={"logprob_chunk": 256}).train.logprob_chunk == 256
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert load_config(p, ["train.logprob_chunk=64"]).train.logprob_chunk == 64
    assert load_config(p, ["train.logprob_chunk=auto"]).train.logprob_chunk == "auto"


@pytest.mark.parametrize("value", [0, -8, "big", 2.5, True, [256]])
def test_bad_logprob_chunk_names_the_key_and_what_is_allowed(value):
    with pytest.raises(ConfigError) as e:
        cfg(train={"logprob_chunk": value})
    assert "train.logprob_chunk" in str(e.value) and "auto or a whole number >= 1" in str(e.value)


@pytest.mark.parametrize("engine", ["unsloth", "vllm"])
def test_an_engine_that_does_not_exist_is_refused_not_ignored(engine):
    """`rollout.engine: unsloth` used to be accepted, warn, and run HF generate: a key that lied."""
    with pytest.raises(ConfigError) as e:
        cfg(rollout={"engine": engine})
    assert "rollout.engine" in str(e.value) and "not implemented" in str(e.value) and "'hf'" in str(e.value)
    assert cfg(rollout={"engine": "hf"}).rollout.engine == "hf"


def test_srpo_weighted_roles_is_checked():
    with pytest.raises(ConfigError, match="algorithm.srpo.weighted_roles"):
        cfg(algorithm={"name": "srpo", "srpo": {"weighted_roles": "vision"}})
