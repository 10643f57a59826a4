"""Every engine and parallel knob is declared once (config.py) and reaches the CLI and Serve."""

from __future__ import annotations

import dataclasses

import pytest

from maverick_ray import knobs
from maverick_ray.cli import build_parser
from maverick_ray.config import ConfigError, EngineConfig, ParallelConfig
from maverick_ray.serve import settings as settings_mod
from maverick_ray.serve.local import app_args_from_cli
from maverick_ray.serve.settings import ServeSettings

KNOBS = [(cls, f) for cls in (EngineConfig, ParallelConfig) for f in knobs.knobs(cls)]
STRUCTURED = {"expert_owner": [0, 1] * 8, "worker_resources": {"expert_host": 2}}
BOUNDED = {"kv_cache_fraction": 0.5}  # knobs whose valid range excludes default + 2.5


def other_value(f: dataclasses.Field):
    """A valid value that differs from the knob's default."""
    if f.metadata["choices"]:
        return next(c for c in reversed(f.metadata["choices"]) if c != f.default)
    if f.name in STRUCTURED:
        return STRUCTURED[f.name]
    if f.name in BOUNDED:
        return BOUNDED[f.name]
    return {"int": 3, "float": 2.5, "str": "x"}[f.type] + (f.default if f.type != "str" else "")


def config_of(cls, settings: ServeSettings):
    return settings.engine() if cls is EngineConfig else settings.parallel()


def test_every_knob_has_help_text_and_every_config_field_is_a_knob():
    for cls in (EngineConfig, ParallelConfig):
        assert {f.name for f in dataclasses.fields(cls)} == {f.name for f in knobs.knobs(cls)}
    for _, f in KNOBS:
        assert len(f.metadata["help"]) > 10, f.name


@pytest.mark.parametrize("cls,f", KNOBS, ids=[f.name for _, f in KNOBS])
def test_knob_reaches_generate_serve_and_the_serve_app(cls, f):
    value = other_value(f)
    # Serve app args (the Serve config's `args:`) take every knob, structured ones included.
    assert getattr(config_of(cls, ServeSettings.from_args({f.name: value})), f.name) == value
    if not f.metadata["cli"]:
        return
    parser = build_parser()
    for command in ("generate", "serve"):
        args = parser.parse_args([command, knobs.flag_of(f), str(value)])
        assert getattr(knobs.from_arguments(cls, args), f.name) == value, command
    # `maverick-ray serve FLAG` deploys an app whose args carry it.
    args = parser.parse_args(["serve", knobs.flag_of(f), str(value)])
    app_args = app_args_from_cli(args, "/ckpt")
    assert app_args[f.name] == value
    assert getattr(config_of(cls, ServeSettings.from_args(app_args)), f.name) == value


def test_serve_defaults_to_ep2_and_generate_to_ep1():
    parser = build_parser()
    assert parser.parse_args(["serve"]).ep_size == 2 and parser.parse_args(["generate"]).ep_size == 1
    assert ServeSettings.from_args({}).parallel().ep_size == 2


def test_bad_choice_and_unknown_arg_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="dtype"):
        ServeSettings.from_args({"dtype": "int4"})
    with pytest.raises(ConfigError, match="max_num_sequences"):
        ServeSettings.from_args({"max_num_sequences": 4})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--placement-strategy", "EVERYWHERE"])


def test_a_knob_added_to_the_config_appears_on_the_cli_and_in_serve(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class WithNewKnob(EngineConfig):
        spec_tokens: int = knobs.knob(0, "speculative tokens per step (a knob made up for this test)")

    monkeypatch.setattr(settings_mod, "EngineConfig", WithNewKnob)
    assert ServeSettings.from_args({"spec_tokens": 4}).engine().spec_tokens == 4
    import argparse

    parser = argparse.ArgumentParser()
    knobs.add_arguments(parser, WithNewKnob)
    args = parser.parse_args(["--spec-tokens", "4"])
    assert knobs.from_arguments(WithNewKnob, args).spec_tokens == 4
    assert "speculative tokens" in parser.format_help()
