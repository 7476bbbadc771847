"""Property-based tests of the config parser: any input gives a Config or a ValueError.

Inputs are presets with a few fields replaced by values of the right type, of the wrong type or out
of range, plus unknown sections and keys, as dicts, ``--set`` strings and files. Whatever parses
must round-trip through dicts, JSON and YAML.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cycleprune import config as C

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every (section, field) and its type, from the dataclasses themselves.
SECTIONS = typing.get_type_hints(C.Config)
FIELDS = [
    (section, field.name, typing.get_type_hints(cls)[field.name])
    for section, cls in SECTIONS.items()
    for field in dataclasses.fields(cls)
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(),  # beyond float range too
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
    st.text(max_size=12),
    st.sampled_from(["balanced", "none", "2:4", "4:2", "sgd", "focal", "youden", "1e-3", "nan"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-2, 4)), inner, max_size=3),
    ),
    max_leaves=8,
)


def _typed(hint) -> st.SearchStrategy:
    """Values of a field's own type, in and out of its valid range."""
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(min_value=-3, max_value=300)
    if hint is float:
        return st.one_of(
            st.floats(min_value=-0.5, max_value=1.5),
            st.floats(0, 20),
            st.sampled_from([math.inf, -math.inf, math.nan, 10**400, "1e999", "1e-3"]),
        )
    if hint is str:
        return st.one_of(
            st.sampled_from(
                ["triangular", "exp_range", "adam", "crossentropy", "constant", "f1", "keras", ""]
            ),
            st.text(alphabet="0123456789:²٣", max_size=6),  # m_by_n-like, with unicode digits
        )
    options = typing.get_args(hint)
    if str in options:  # class_weight: str | tuple[float, ...]
        return st.one_of(
            st.sampled_from(["balanced", "none"]),
            st.lists(st.floats(0.01, 5), min_size=2, max_size=3),
            st.dictionaries(
                st.one_of(st.integers(0, 2), st.floats(), st.text(max_size=2)),
                st.one_of(st.floats(0.01, 5), st.floats()),
                min_size=2,
                max_size=3,
            ),
        )
    (item,) = {a for a in options if a is not Ellipsis}
    return st.lists(_typed(item), min_size=0, max_size=4)


unknown_keys = st.lists(st.one_of(st.text(max_size=5), st.integers()), min_size=1, max_size=3)


@st.composite
def config_dicts(draw) -> dict:
    """A preset's dict with a few fields replaced, sometimes with junk or unknown keys."""
    data = C.preset(draw(st.sampled_from(sorted(C.PRESETS)))).to_dict()
    for _ in range(draw(st.integers(1, 4))):
        section, name, hint = draw(st.sampled_from(FIELDS))
        data[section][name] = draw(st.one_of(_typed(hint), _typed(hint), values))
    if draw(st.integers(0, 9)) == 0:
        data.update(dict.fromkeys(draw(unknown_keys), draw(values)))
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(sorted(SECTIONS)))].update(
            dict.fromkeys(draw(unknown_keys), draw(values))
        )
    return data


def _assert_round_trips(cfg: C.Config) -> None:
    assert C.Config.from_dict(cfg.to_dict()) == cfg
    assert C.Config.from_json(cfg.to_json()) == cfg
    assert C.Config.from_yaml(cfg.to_yaml()) == cfg


@SETTINGS
@given(config_dicts())
def test_any_dict_gives_a_config_that_round_trips_or_a_value_error(data):
    try:
        cfg = C.Config.from_dict(data)
    except ValueError as err:
        assert str(err)
        return
    _assert_round_trips(cfg)
    for section, fields in data.items():
        for name, value in fields.items():
            got = getattr(getattr(cfg, section), name)
            if isinstance(value, float) and not isinstance(got, tuple):
                assert got == value  # values arrive unchanged (ints may widen to floats)


def _flow(value) -> str:
    """A value as one line of YAML, as typed after ``--set section.field=``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").strip().replace("\n", " ")


@st.composite
def overrides(draw) -> tuple[str, str]:
    section, name, hint = draw(st.sampled_from(FIELDS))
    raw = draw(st.one_of(_typed(hint).map(_flow), values.map(_flow), st.text(max_size=20)))
    return f"{section}.{name}", raw.replace("\n", " ")


@SETTINGS
@given(overrides())
def test_any_override_gives_a_config_or_a_value_error_naming_it(override):
    field, raw = override
    section, name = field.split(".")
    assignment = f"{section}.{name}={raw}"
    try:
        cfg = C.load_config("smoke", overrides=[assignment])
    except ValueError as err:
        # The field itself, or (a cross-field rule) the field it constrains, naming this one.
        assert f"{section}.{name}" in str(err) or name in str(err), str(err)
        return
    _assert_round_trips(cfg)


@SETTINGS
@given(
    st.one_of(
        config_dicts().map(lambda d: yaml.safe_dump(d, sort_keys=False)),
        st.text(max_size=60),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    ),
    st.sampled_from([".yaml", ".json", ".yml"]),
    st.booleans(),
)
def test_any_config_file_gives_a_config_or_a_value_error_naming_the_file(text, suffix, raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"hostile{suffix}"
        if raw:
            path.write_bytes(text.encode("utf-8", "surrogatepass")[:40] + b"\xff\xfe")
        else:
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = C.load_config("small", path)
        except ValueError as err:
            assert path.name in str(err), str(err)
            return
    _assert_round_trips(cfg)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (10**400, r"train\.momentum must be finite"),
        (math.inf, r"train\.momentum must be finite"),
        ({1: 2, "a": 3}, r"Unknown key\(s\) in train: 1, a"),
    ],
)
def test_cases_hypothesis_found(value, message):
    data = C.preset("small").to_dict()
    if isinstance(value, dict):
        data["train"].update(value)
    else:
        data["train"]["momentum"] = value
    with pytest.raises(ValueError, match=message):
        C.Config.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prune.m_by_n='²:4'"], r"prune\.m_by_n must look like '2:4'"),
        (["data.class_weight={0: .inf, 1: 1.0}"], r"data\.class_weight must hold one weight"),
        (["data.class_weight={.inf: 1.0, 1: 1.0}"], r"data\.class_weight keys must be"),
        (["select.formats=[tflite_int9]"], r"select\.formats must all be one of"),
        (["select.formats=[]"], r"select\.formats must not be empty"),
        (["prune.sparsities={a: 1}"], r"prune\.sparsities must be a list of numbers"),
    ],
)
def test_override_cases_hypothesis_found(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load_config("small", overrides=overrides)


def test_unreadable_and_hostile_config_files_name_the_file(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  epochs: \xff\xfe\n")
    with pytest.raises(ValueError, match=r"binary\.yaml.*UTF-8"):
        C.load_config("small", binary)
    marker = tmp_path / "PWNED"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match=r"Cannot parse config file .*tagged\.yaml"):
        C.load_config("small", tagged)
    assert not marker.exists()
    with pytest.raises(ValueError, match="Cannot parse"):
        C.Config.from_yaml("train: [")
