import dataclasses

import pytest

from embed_ft import losses, options
from embed_ft.errors import InputError
from embed_ft.options import Config


def test_every_numeric_option_has_a_range_and_every_choice_is_checked():
    numeric = {f.name for f in dataclasses.fields(Config) if f.type in ("int", "float")}
    assert numeric == set(options.RANGES)
    assert set(options.LOSSES) == set(losses.BY_NAME)
    for name, rule in options.RANGES.items():  # the default is in range, a value just outside is not
        options.check(Config())
        low = float(rule.split("..")[0] if ".." in rule else rule.split()[1])
        below = low - 1 if ">=" in rule or ".." in rule else low
        with pytest.raises(InputError, match=f"--{name.replace('_', '-')} must be "):
            options.check(dataclasses.replace(Config(), **{name: type(getattr(Config(), name))(below)}))
    with pytest.raises(InputError, match=r"--precision must be one of auto, bf16, fp16, fp32 \(got fp8\)"):
        options.check(Config(precision="fp8"))


def test_out_of_range_names_the_bound():
    assert options.out_of_range(0.5, "0..1") is None and options.out_of_range(1.5, "0..1") == "between 0 and 1"
    assert options.out_of_range(0, ">= 0") is None and options.out_of_range(-1, ">= 0") == "at least 0"
    assert options.out_of_range(0, "> 0") == "more than 0" and options.out_of_range(1e-9, "> 0") is None


def test_help_lists_every_option_and_flags_round_trip(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text
    assert options.parse_args(["--freeze-encoder", "--lr", "1e-4"]) == Config(freeze_encoder=True, lr=1e-4)
    changed = Config(freeze_encoder=True, lr=1e-4, matryoshka_dims="64,128", select_best=False, out="x y")
    assert options.parse_args(options.to_flags(changed)) == changed  # what torchrun's ranks are given


def test_set_takes_the_flag_spelling_too():
    assert options.parse_overrides("eval-size=500 --lr=1e-4 batch_size=8") == {"eval_size": 500, "lr": 1e-4, "batch_size": 8}
