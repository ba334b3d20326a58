"""Policy grammar: one table drives parsing and printing, so every policy round-trips; every bad input names itself."""

from __future__ import annotations

import itertools
import random

import pytest

from precision.errors import PrecisionError, ReportError, SpecError, UnavailableError
from precision.formats import FORMATS, get_format
from precision.policy import PRESETS, Policy, get_policy, parse_policy

F = FORMATS
ACCUM = ("fp32", "fp64")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip(name):
    preset = PRESETS[name]
    text = str(preset)
    assert parse_policy(text) == preset
    assert str(parse_policy(text)) == text
    assert parse_policy(name) is preset
    assert preset.name == name  # a preset prints its name in tables


def test_required_presets_exist_with_their_recipes():
    for name in ("fp64", "fp32", "fp16", "bf16"):
        pol = PRESETS[name]
        fmt = F[name]
        assert (pol.params, pol.compute, pol.state, pol.master) == (fmt, fmt, fmt, None)
        assert pol.accum == (F["fp64"] if name == "fp64" else F["fp32"])
    for name, low in (("fp16-mixed", "fp16"), ("bf16-mixed", "bf16")):
        pol = PRESETS[name]
        assert (pol.params, pol.compute, pol.accum, pol.state, pol.master) == (F[low], F[low], F["fp32"],
                                                                              F["fp32"], F["fp32"])
        assert pol.update == F["fp32"] and pol.weights == F["fp32"]


def random_policy_text(rng: random.Random) -> str:
    """A canonical (table-ordered) policy string with random valid fields."""
    names = list(FORMATS)
    compute = rng.choice(names)
    accum = rng.choice([a for a in ACCUM if F[a].precision >= F[compute].precision])
    fields = [f"p={rng.choice(names)}", f"c={compute}", f"a={accum}", f"s={rng.choice(names)}"]
    if rng.random() < 0.5:
        fields.append(f"m={rng.choice(names)}")
    if rng.random() < 0.5:
        fields.append(f"ls={2 ** rng.randint(-4, 40)}" if rng.random() < 0.8 else f"ls={2.0 ** -rng.randint(1, 9)!r}")
    return ",".join(fields)


def test_random_policies_round_trip():
    rng = random.Random(1234)
    seen = set()
    for _ in range(500):
        text = random_policy_text(rng)
        pol = parse_policy(text)
        assert str(pol) == text
        assert parse_policy(str(pol)) == pol
        seen.add(text)
        # Field order and spacing are free on input; the printed form is canonical.
        parts = text.split(",")
        rng.shuffle(parts)
        assert parse_policy(" , ".join(parts)) == pol
    assert len(seen) > 400  # the sample is not degenerate


def test_every_format_in_every_field_round_trips():
    for key, name in itertools.product(("p", "c", "s", "m"), FORMATS):
        text = "p=fp64,c=fp64,a=fp64,s=fp64,m=fp64".replace(f"{key}=fp64", f"{key}={name}")
        assert str(parse_policy(text)) == text


def test_defaults_come_from_params():
    pol = parse_policy("p=bf16")
    assert (pol.params, pol.compute, pol.state, pol.accum) == (F["bf16"], F["bf16"], F["bf16"], F["fp32"])
    assert pol.master is None and pol.loss_scale is None
    assert parse_policy("p=fp64").accum == F["fp64"]  # accum is at least as wide as compute
    assert parse_policy("p=fp16,c=fp64").accum == F["fp64"]
    assert parse_policy("p=bf16,s=fp32").update == F["fp32"]  # update format: the wider of weights and state
    assert parse_policy("p=bf16,m=fp32").update == F["fp32"]
    assert parse_policy("p=bf16").update == F["bf16"]
    assert parse_policy("p=bf16,ls=1024").loss_scale == 1024.0
    assert parse_policy("p=fp16,c=fp16") == PRESETS["fp16"]
    assert parse_policy("p=fp16,c=fp16").name == "fp16"
    assert parse_policy("p=fp16,s=fp32").name == "p=fp16,c=fp16,a=fp32,s=fp32"


def test_get_policy_accepts_both():
    assert get_policy("bf16-mixed") is PRESETS["bf16-mixed"]
    assert get_policy(PRESETS["fp32"]) is PRESETS["fp32"]
    assert get_policy("  bf16  ") is PRESETS["bf16"]


# (input, text every message must contain)
BAD = [
    ("fp17", "unknown policy 'fp17'; valid choices: fp64, fp32, fp16, bf16"),
    ("", "unknown policy ''"),
    ("p=bf16,x=fp32", "unknown policy key 'x'"),
    ("p=bf16,P=fp32", "unknown policy key 'P'"),
    ("p=fp12", "unknown format 'fp12'; valid choices: fp64"),
    ("p=bf16,s=float8", "unknown format 'float8'"),
    ("p=bf16,p=fp32", "policy key 'p' given twice"),
    ("p=bf16,c=bf16,c=bf16", "policy key 'c' given twice"),
    ("p=bf16,", "malformed policy field ''"),
    ("p=bf16,c", "malformed policy field 'c'"),
    ("p=bf16,c=", "malformed policy field 'c='"),
    ("p=bf16,=fp32", "unknown policy key ''"),
    ("c=bf16", "policy 'c=bf16' has no params format"),
    ("p=fp64,c=fp64,a=fp32", "accumulation format fp32 is narrower than compute fp64"),
    ("p=bf16,a=bf16", "accumulation format 'bf16' is not supported; valid choices: fp32, fp64"),
    ("p=fp16,a=fp16", "accumulation format 'fp16' is not supported"),
    ("p=bf16,ls=1000", "loss scale 1000.0 must be a positive power of two"),
    ("p=bf16,ls=0", "loss scale 0.0 must be a positive power of two"),
    ("p=bf16,ls=-1024", "loss scale -1024.0 must be a positive power of two"),
    ("p=bf16,ls=inf", "loss scale inf must be"),
    ("p=bf16,ls=nan", "loss scale nan must be"),
    ("p=bf16,ls=big", "loss scale 'big' in 'p=bf16,ls=big' is not a number"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[b[0] or "empty" for b in BAD])
def test_bad_policies_name_the_bad_value(text, message):
    with pytest.raises(SpecError) as info:
        parse_policy(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)  # one line, for the CLI


def test_policy_constructor_validates_too():
    """Direct construction goes through the same checks as the grammar (no assert-based validation)."""
    with pytest.raises(SpecError, match="narrower than compute fp64"):
        Policy(F["fp64"], F["fp64"], F["fp32"], F["fp64"])
    with pytest.raises(SpecError, match="'fp8_e4m3fn' is not supported"):
        Policy(F["fp8_e4m3fn"], F["fp8_e4m3fn"], F["fp8_e4m3fn"], F["fp32"])
    with pytest.raises(SpecError, match="loss scale 3.0"):
        Policy(F["fp16"], F["fp16"], F["fp32"], F["fp32"], loss_scale=3.0)
    # The check compares formats by value: an equal Format built elsewhere is accepted.
    fp32_copy = type(F["fp32"])(**{f: getattr(F["fp32"], f) for f in ("name", "exponent_bits", "mantissa_bits",
                                                                      "dtype_name", "finite_only")})
    assert Policy(F["fp32"], F["fp32"], fp32_copy, F["fp32"]) == PRESETS["fp32"]
    assert get_format("fp32") is F["fp32"]


@pytest.mark.parametrize("error", [SpecError, ReportError, UnavailableError])
def test_errors_are_value_errors(error):
    assert issubclass(error, PrecisionError)
    assert issubclass(PrecisionError, ValueError)
    with pytest.raises(ValueError):
        raise error("x")
