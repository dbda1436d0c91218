"""One override syntax: positional key=value after the options for every command (serve and eval
included); `--set` still works, with a deprecation warning."""

from __future__ import annotations

from llava_platform.cli import build_parser
from llava_platform.commands import serve
from llava_platform.commands.overrides import collect_overrides


def test_eval_takes_positional_overrides_and_the_deprecated_set(capsys):
    args = build_parser().parse_args(["eval", "--model", "m", "--set", "a.b=1", "generation.batch_size=4"])
    assert collect_overrides(args, "llavactl eval") == ["a.b=1", "generation.batch_size=4"]
    assert "--set is deprecated" in capsys.readouterr().err
    args = build_parser().parse_args(["eval", "--model", "m", "x=1"])
    assert collect_overrides(args, "llavactl eval") == ["x=1"]
    assert capsys.readouterr().err == ""


def test_serve_overrides_after_the_options_in_any_order_and_reload_still_a_subcommand(capsys):
    args = serve._merge_rest(build_parser().parse_args(
        ["serve", "--model", "m", "model.max_batch_size=16", "--port", "9001", "--set", "limits.max_images=2",
         "route_prefix=/x"]))
    assert args.port == 9001 and args.model == "m"
    assert collect_overrides(args, "llavactl serve") == ["limits.max_images=2", "model.max_batch_size=16",
                                                         "route_prefix=/x"]
    cfg = serve._load_serve_config(args)
    assert cfg.model.max_batch_size == 16 and cfg.limits.max_images == 2 and cfg.model_uri == "m"
    # `serve reload` parses its own options (nothing listens on port 9: it fails fast, saying so)
    args = build_parser().parse_args(["serve", "reload", "--address", "http://127.0.0.1:9", "--timeout", "2"])
    assert args.func(args) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
