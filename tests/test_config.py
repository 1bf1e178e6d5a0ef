import pytest

from prac_fx import PracConfig, backend


@pytest.mark.parametrize("rank, message", [
    (0, "rank must be an int >= 1"),
    (-3, "rank must be an int >= 1"),
    (0.0, "must lie in (0, 1]"),
    (1.5, "must lie in (0, 1]"),
    ("16", "rank must be an int >= 1 or a float"),
    (None, "rank must be an int >= 1 or a float"),
    (True, "rank must be an int >= 1 or a float"),
])
def test_bad_rank(rank, message):
    with pytest.raises(ValueError) as err:
        PracConfig(rank=rank)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=16, split=32), "must not exceed rank"),
    (dict(rank=0.5, split=4), "needs an integer rank"),
    (dict(rank=16, split=1.5), "principal fraction, in [0, 1]"),
    (dict(rank=16, split=-1), "must be >= 0"),
    (dict(rank=16, split="half"), "split must be"),
    (dict(refresh_every=0), "refresh_every must be an int >= 1"),
    (dict(resample_every=2.5), "resample_every must be an int >= 1 (training calls) or None"),
    (dict(resample_every=0), "resample_every must be an int >= 1"),
    (dict(seed="x"), "seed must be an int"),
    (dict(rank={}), "needs at least one entry"),
    (dict(rank={"": 0.25}), "non-empty substring"),
    (dict(rank={"*": 0.25, "attn": 1.5}), "must lie in (0, 1]"),
    (dict(rank={"*": 16, "attn": 0.5}, split=4), "needs an integer rank"),
    (dict(early_refits=-1), "early_refits must be an int in [0, 16]"),
    (dict(early_refits=True), "early_refits must be an int"),
    (dict(site_filter=3), "site_filter must be callable"),
    (dict(complement_scale=-1.0), "complement_scale must be a positive number"),
    (dict(exact_heads="lm_head"), "exact_heads must be a tuple of module names"),
    (dict(exact_heads=("model.lm_head",)), "without dots"),
    (dict(exact_heads=(3,)), "exact_heads must be"),
])
def test_bad_fields(kwargs, message):
    with pytest.raises(ValueError) as err:
        PracConfig(**kwargs)
    assert message in str(err.value)


def test_unknown_backend_option():
    with pytest.raises(ValueError, match="unknown option"):
        backend(rank=0.25, rnak=3)


@pytest.mark.parametrize("rank, split, n, expected", [
    (0.25, 0.5, 256, (32, 32)),
    (1.0, 0.5, 64, (32, 32)),
    (32, 0.5, 256, (16, 16)),
    (32, 8, 256, (8, 24)),
    (32, 0.0, 256, (0, 32)),
    (32, 1.0, 256, (32, 0)),
    (0.01, 0.5, 16, (0, 1)),  # at least one column
])
def test_ranks(rank, split, n, expected):
    assert PracConfig(rank=rank, split=split).ranks(n) == expected


def test_integer_rank_wider_than_site_is_too_narrow():
    assert PracConfig(rank=64).ranks(32) is None


def test_frozen():
    config = PracConfig()
    with pytest.raises(Exception):
        config.rank = 3


def test_exact_heads_match_the_last_path_component():
    config = PracConfig()
    assert config.is_head("lm_head") and config.is_head("model.lm_head")
    assert config.is_head("classifier") and config.is_head("output")
    assert not config.is_head("lm_head.proj") and not config.is_head("bert.encoder.layer.0.output.dense")
    assert not PracConfig(exact_heads=()).is_head("lm_head")
    assert PracConfig(exact_heads=["proj"]).exact_heads == ("proj",)


def test_resample_period_follows_refresh_by_default():
    assert PracConfig(refresh_every=200).resample_period == 200
    assert PracConfig(refresh_every=200, resample_every=7).resample_period == 7


def test_complement_choices():
    assert PracConfig().complement == "held"
    assert PracConfig(complement="cycle").complement == "cycle"
    with pytest.raises(ValueError, match=r"complement must be one of \('held', 'cycle'\)"):
        PracConfig(complement="cyclic")
    with pytest.raises(ValueError, match="use one or the other"):
        PracConfig(complement="cycle", subspace_iters=1)
    assert PracConfig.from_env({"PRAC_FX_COMPLEMENT": "cycle"}).complement == "cycle"
    with pytest.raises(ValueError, match="PRAC_FX_.*complement must be one of"):
        PracConfig.from_env({"PRAC_FX_COMPLEMENT": "7"})


def test_exact_if_kept_flag():
    assert PracConfig().exact_if_kept is False
    with pytest.raises(ValueError, match="exact_if_kept must be True or False"):
        PracConfig(exact_if_kept=1)
    for text, flag in (("1", True), ("true", True), ("False", False), ("0", False)):
        assert PracConfig.from_env({"PRAC_FX_EXACT_IF_KEPT": text}).exact_if_kept is flag
    with pytest.raises(ValueError, match="PRAC_FX_EXACT_IF_KEPT must be 1, true, 0 or false"):
        PracConfig.from_env({"PRAC_FX_EXACT_IF_KEPT": "yes"})


def test_early_refit_calls():
    assert PracConfig().early_refit_calls == frozenset()
    assert PracConfig(early_refits=4).early_refit_calls == {31, 62, 125, 250}
    assert PracConfig(refresh_every=4, early_refits=5).early_refit_calls == {1, 2}  # no call 0
    assert PracConfig.from_env({"PRAC_FX_EARLY_REFITS": "3"}).early_refits == 3


def test_rank_mapping():
    config = PracConfig(rank={"*": 0.25, "attn": 0.125, "attn.c_proj": 32, "mlp.c_fc": 0.375})
    assert config.rank_for("h.0.attn.c_attn") == 0.125
    assert config.rank_for("h.0.attn.c_proj") == 32  # the longest key wins
    assert config.rank_for("h.0.mlp.c_proj") == 0.25
    assert config.ranks(256, "h.0.mlp.c_fc") == (48, 48)
    assert config.ranks(16, "h.0.attn.c_proj") is None  # too narrow for 32 columns
    only = PracConfig(rank={"attn": 0.25})
    assert only.rank_for("h.0.attn.c_attn") == 0.25 and only.rank_for("h.0.mlp.c_fc") is None
    assert PracConfig(rank=0.25).rank_for("anything") == 0.25


def test_parse_rank_and_environment():
    from prac_fx.config import parse_rank

    assert parse_rank("0.25") == 0.25 and parse_rank("32") == 32
    assert parse_rank("*=0.25, attn=16") == {"*": 0.25, "attn": 16}
    for bad in ("*=0.25,attn", "=0.25", "*=x"):
        with pytest.raises(ValueError):
            parse_rank(bad)
    env = PracConfig.from_env({"PRAC_FX_RANK": "*=0.25,mlp=0.375"})
    assert env.rank == {"*": 0.25, "mlp": 0.375}


def test_strict_flag_and_its_environment_default(monkeypatch):
    monkeypatch.delenv("PRAC_FX_STRICT", raising=False)
    assert PracConfig().strict is False
    monkeypatch.setenv("PRAC_FX_STRICT", "1")
    assert PracConfig().strict is True  # the default follows the variable
    assert PracConfig(strict=False).strict is False  # an explicit value wins
    assert PracConfig.from_env({"PRAC_FX_STRICT": "false"}).strict is False
    monkeypatch.setenv("PRAC_FX_STRICT", "maybe")
    with pytest.raises(ValueError, match="PRAC_FX_STRICT must be 1, true, 0 or false"):
        PracConfig()
    with pytest.raises(ValueError, match="strict must be True or False"):
        PracConfig(strict=1)


def test_backend_docstring_names_every_option():
    import dataclasses

    import prac_fx

    doc = prac_fx.backend.__doc__
    missing = [f.name for f in dataclasses.fields(PracConfig) if f"``{f.name}``" not in doc]
    assert not missing, missing


def test_defaults_resolve_together():
    """Nothing given: the default copy (the input itself, quantized); a rank given alone: PRAC's
    float projection as in the papers; bits given alone: the input itself in those bits."""
    from prac_fx.config import DEFAULT_BITS, DEFAULT_GROUP_SIZE

    default = PracConfig()
    assert (default.rank, default.bits, default.group_size) == (1.0, DEFAULT_BITS, DEFAULT_GROUP_SIZE)
    assert default.format_for(256).layout == "identity" and default.format_for(256).bits == DEFAULT_BITS
    projected = PracConfig(rank=0.25)
    assert (projected.bits, projected.group_size) == (None, None)
    assert projected.format_for(256).bits is None
    alone = PracConfig(bits=8)
    assert (alone.rank, alone.group_size) == (1.0, None)
    exact = PracConfig(bits=None)
    assert (exact.rank, exact.bits) == (1.0, None)  # no projection, no quantization
    assert PracConfig(rank=1.0).bits is None  # the exact path the tests use
    assert PracConfig(group_size=128).bits == DEFAULT_BITS  # the default copy, other groups
    assert PracConfig.from_env({}) == default == PracConfig(rank=1.0, bits=DEFAULT_BITS,
                                                            group_size=DEFAULT_GROUP_SIZE)
    assert PracConfig.from_env({"PRAC_FX_RANK": "0.25"}).bits is None
    import prac_fx

    assert prac_fx.backend().config == default
