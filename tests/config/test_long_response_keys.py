"""train.offload_activations and train.recompute_chunk: defaults off, checked values, errors that name the key."""
import pytest

from lite_srpo.config import config_from_dict
from lite_srpo.errors import ConfigError

BASE = {"model": {"path": "some/model"}, "data": {"task": "count_shapes"}}


def cfg(**sections):
    return config_from_dict({**BASE, **sections})


def test_defaults_are_off_and_good_values_load():
    c = cfg()
    assert c.train.offload_activations is False and c.train.recompute_chunk == 0
    c = cfg(train={"offload_activations": True, "recompute_chunk": 512})
    assert c.train.offload_activations is True and c.train.recompute_chunk == 512


@pytest.mark.parametrize("value", [-1, 2.5, True, "big"])
def test_bad_recompute_chunk_names_the_key(value):
    with pytest.raises(ConfigError, match=r"train\.recompute_chunk"):
        cfg(train={"recompute_chunk": value})


def test_bad_offload_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.offload_activations"):
        cfg(train={"offload_activations": "yes please"})


def test_offload_needs_gradient_checkpointing():
    with pytest.raises(ConfigError, match=r"train\.offload_activations.*model\.gradient_checkpointing"):
        cfg(train={"offload_activations": True}, model={"path": "some/model", "gradient_checkpointing": False})
