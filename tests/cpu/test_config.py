"""FlexPrefillConfig: defaults, reference aliases, and errors that say what to fix."""

import pytest

from vllm_flexprefill.config import FlexPrefillConfig


def test_defaults_and_block_budgets():
    cfg = FlexPrefillConfig()
    assert (cfg.gamma, cfg.tau, cfg.min_budget, cfg.max_budget, cfg.sparse_block_size) == (0.95, 0.1, 1024, None, 128)
    assert cfg.min_blocks == 8 and cfg.max_blocks is None
    # gamma 0.99 in the first half of the layers, gamma in the rest
    assert cfg.layer_gamma == ((0.0, 0.5, 0.99),) and cfg.to_dict()["layer_gamma"] == {"0%-50%": 0.99}
    assert [cfg.for_depth(28).for_layer(i).gamma for i in (0, 13, 14, 27)] == [0.99, 0.99, 0.95, 0.95]
    assert [cfg.for_depth(30).for_layer(i).gamma for i in (14, 15)] == [0.99, 0.95]
    assert cfg.for_layer(None).gamma == 0.95  # a layer of unknown index (the functional API)
    assert FlexPrefillConfig(min_budget=1000, max_budget=1025, sparse_block_size=64).min_blocks == 16
    assert FlexPrefillConfig(min_budget=None, max_budget=1025, sparse_block_size=64).max_blocks == 17
    assert FlexPrefillConfig(min_budget=None).min_blocks == 1


def test_reference_keys_are_accepted():
    cfg = FlexPrefillConfig.from_dict({"block_size": 64, "flex_prefill_gamma": 0.9, "flex_prefill_tau": 0.2,
                                       "flex_prefill_min_budget": 512, "flex_prefill_max_budget": 4096})
    assert cfg == FlexPrefillConfig(gamma=0.9, tau=0.2, min_budget=512, max_budget=4096, sparse_block_size=64)
    assert FlexPrefillConfig.from_dict(cfg.to_dict()) == cfg
    assert FlexPrefillConfig.from_dict(None) == FlexPrefillConfig()


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown flexprefill config key 'gama'; did you mean 'gamma'\? allowed keys: .*gamma.*tau"):
        FlexPrefillConfig.from_dict({"gama": 0.9})
    with pytest.raises(ValueError, match="sets 'gamma' twice"):
        FlexPrefillConfig.from_dict({"gamma": 0.9, "flex_prefill_gamma": 0.8})
    with pytest.raises(ValueError, match="must be a dictionary"):
        FlexPrefillConfig.from_dict([("gamma", 0.9)])


@pytest.mark.parametrize("kwargs,message", [
    ({"gamma": 0}, "gamma"), ({"gamma": True}, "gamma"), ({"tau": float("nan")}, "tau"),
    ({"tau": float("inf")}, "tau"), ({"min_budget": 0}, "min_budget"), ({"max_budget": 1.5}, "max_budget"),
    ({"sparse_block_size": 96}, "sparse_block_size"), ({"min_sparse_tokens": -1}, "min_sparse_tokens"),
])
def test_bad_values_name_the_field_and_where_to_set_it(kwargs, message):
    with pytest.raises(ValueError, match=f"{message}.*additional_config"):
        FlexPrefillConfig(**kwargs)


def test_layer_gamma_sets_some_layers_and_reads_back():
    cfg = FlexPrefillConfig.from_dict({"gamma": 0.9, "layer_gamma": {"14-24": 0.95, 3: 1}})
    assert cfg.gamma == 0.9 and cfg.layer_gamma == ((3, 3, 1.0), (14, 24, 0.95))
    assert [cfg.for_layer(i).gamma for i in (0, 3, 13, 14, 24, 25)] == [0.9, 1.0, 0.9, 0.95, 0.95, 0.9]
    assert cfg.for_layer(14).layer_gamma is None and cfg.for_layer(14).tau == cfg.tau
    uniform = FlexPrefillConfig(layer_gamma=None)
    assert cfg.for_layer(None) is cfg and uniform.for_layer(7) == uniform
    assert cfg.to_dict()["layer_gamma"] == {"3": 1.0, "14-24": 0.95}
    assert FlexPrefillConfig.from_dict(cfg.to_dict()) == cfg
    # {} and None: gamma in every layer, and so it reads back (not as the default)
    assert FlexPrefillConfig.from_dict({"layer_gamma": {}}) == uniform and uniform.to_dict()["layer_gamma"] == {}
    assert FlexPrefillConfig.from_dict(uniform.to_dict()) == uniform != FlexPrefillConfig()


def test_layer_gamma_by_share_of_the_depth_becomes_the_model_s_layers():
    cfg = FlexPrefillConfig.from_dict({"gamma": 0.95, "layer_gamma": {"0%-50%": 0.99, "27": 1.0}})
    assert cfg.layer_gamma == ((27, 27, 1.0), (0.0, 0.5, 0.99))
    assert cfg.to_dict()["layer_gamma"] == {"27": 1.0, "0%-50%": 0.99}
    assert FlexPrefillConfig.from_dict(cfg.to_dict()) == cfg
    # the first half: layers 0-13 of 28, 0-14 of 30 (layer i sits at i / depth < 50 %)
    assert cfg.for_depth(28).layer_gamma == ((0, 13, 0.99), (27, 27, 1.0))
    assert cfg.for_depth(30).layer_gamma == ((0, 14, 0.99), (27, 27, 1.0))
    assert [cfg.for_depth(28).for_layer(i).gamma for i in (0, 13, 14, 27)] == [0.99, 0.99, 0.95, 1.0]
    # a share that holds no layer drops out; settings without shares pass through
    assert FlexPrefillConfig(layer_gamma={"40%-45%": 0.99}).for_depth(2).layer_gamma is None
    assert FlexPrefillConfig(layer_gamma={"3": 0.99}).for_depth(2) == FlexPrefillConfig(layer_gamma={"3": 0.99})
    with pytest.raises(ValueError, match=r"names layers by share of the depth: call for_depth\(num_layers\)"):
        cfg.for_layer(3)
    with pytest.raises(ValueError, match="names layers 13-13 twice.*in a model of 28 layers"):
        FlexPrefillConfig(layer_gamma={"0%-50%": 0.99, "13": 1.0}).for_depth(28)


@pytest.mark.parametrize("layer_gamma,message", [
    ({"50%-10%": 0.9}, "must run from 0% up to at most 100%"), ({"0%-150%": 0.9}, "must run from 0% up to at most"),
    ({"0-50%": 0.9}, "by index, inclusive range or share of the depth"),
    ({"0%-50%": 0.9, "25%-75%": 0.99}, "names the depth from 25%-50% twice"),
    ({"a": 0.9}, "by index, inclusive range"), ({"-1": 0.9}, "by index, inclusive range"),
    ({"5-2": 0.9}, "from a layer index >= 0 up"), ({"2": 1.5}, r"gamma for layers '2' must be a number in \(0, 1\]"),
    ({"1-5": 0.9, "5-8": 0.95}, "names layers 5-5 twice"), ([0.9], "must be a dictionary of layers to gamma"),
    ({True: 0.9}, "by index, inclusive range"),
])
def test_bad_layer_gamma_says_what_to_write(layer_gamma, message):
    with pytest.raises(ValueError, match=f"{message}.*additional_config"):
        FlexPrefillConfig(layer_gamma=layer_gamma)
