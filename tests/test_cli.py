"""One command-line vocabulary across the verbs (issue 25): ``--model`` is a model name,
``--checkpoint`` a path, ``--latency-runs``/``--warmup``/``--threads`` mean the same
everywhere; the old spellings still parse; every flag has a help text. Parsers only: nothing
here trains, scores or times a model."""

from __future__ import annotations

import importlib

import pytest
import torch

from edgediag import VERBS, cli

RUN_MODELS = ("train", "evaluate", "predict", "prune", "export", "bench", "monitor", "verify", "demo")


def verb_parser(verb: str):
    return importlib.import_module(f"edgediag.{verb}").parser()


def test_every_verb_is_checked():
    assert set(VERBS) == {"train", "evaluate", "predict", "prune", "export", "bench", "monitor", "verify",
                          "tegrastats", "demo"}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_optional_flag_has_a_help_text(verb):
    missing = [a.option_strings[-1] for a in verb_parser(verb)._actions
               if a.option_strings and not (a.help or "").strip()]
    assert not missing, f"{verb}: flags without a help text: {missing}"


@pytest.mark.parametrize("verb", RUN_MODELS)
def test_verbs_that_run_models_take_threads_with_their_default(verb):
    threads = [a for a in verb_parser(verb)._actions if "--threads" in a.option_strings]
    assert threads and "default" in threads[0].help, verb


@pytest.mark.parametrize("verb, new, old", [
    ("predict", ["--checkpoint", "m.onnx"], ["--model", "m.onnx"]),
    ("monitor", ["--checkpoint", "m.onnx", "--source", "a.wav"], ["--model", "m.onnx", "--source", "a.wav"]),
    ("monitor", ["--checkpoint", "m.onnx", "--source", "a.wav"], ["--model=m.onnx", "--source", "a.wav"]),
    ("bench", ["--checkpoint", "a.pt", "b.onnx", "--out", "o", "--latency-runs", "7"],
     ["--model", "a.pt", "b.onnx", "--out", "o", "--iters", "7"]),
])
def test_old_spellings_still_parse_to_the_same_arguments(verb, new, old):
    assert vars(verb_parser(verb).parse_args(old)) == vars(verb_parser(verb).parse_args(new))


def test_artifact_and_timing_flags_are_named_alike():
    assert verb_parser("predict").parse_args(["--model", "m.onnx"]).checkpoint == "m.onnx"
    assert verb_parser("monitor").parse_args(["--model", "m.pt", "--source", "-"]).checkpoint == "m.pt"
    bench = verb_parser("bench").parse_args(["--model", "a.pt", "b.onnx", "--out", "o", "--iters", "7",
                                             "--warmup", "2", "--rounds", "3"])
    assert (bench.checkpoint, bench.latency_runs, bench.warmup, bench.rounds) == (["a.pt", "b.onnx"], 7, 2, 3)
    for verb in ("prune", "export", "bench"):
        assert any("--latency-runs" in a.option_strings for a in verb_parser(verb)._actions), verb
    for verb in ("evaluate", "predict", "prune", "export", "bench", "monitor"):
        assert any("--checkpoint" in a.option_strings for a in verb_parser(verb)._actions), verb


@pytest.mark.parametrize("verb, alias", [("predict", "--model"), ("bench", "--model"), ("bench", "--iters"),
                                         ("monitor", "--model")])
def test_help_and_errors_name_only_the_new_spelling(verb, alias):
    p = verb_parser(verb)
    text = p.format_help()
    assert "--checkpoint" in text and alias not in text
    with pytest.raises(cli.UserError, match="required: --checkpoint"):
        p.parse_args([])


def test_an_alias_may_not_shadow_an_option():
    p = cli.make_parser("x", "test")
    action = p.add_argument("--checkpoint")
    with pytest.raises(ValueError, match="--debug"):
        cli.add_alias(p, action, "--debug")


def test_train_threads_sets_the_train_config():
    from edgediag import train

    args = train.parser().parse_args(["--model", "tastgram_mfn_small", "--out", "o", "--threads", "3"])
    assert train.resolve_configs(args)[3].threads == 3
    args = train.parser().parse_args(["--model", "tastgram_mfn_small", "--out", "o", "--set", "train.threads=2"])
    assert train.resolve_configs(args)[3].threads == 2
    with pytest.raises(cli.UserError, match="--threads"):
        train.parser().parse_args(["--model", "tastgram_mfn_small", "--out", "o", "--threads", "0"])


def test_prune_threads_reach_fine_tuning_and_the_whole_run(tmp_path, monkeypatch):
    from edgediag import prune

    seen = {}

    def fake_run(args):
        seen.update(overrides=list(args.overrides), threads=torch.get_num_threads())
        return 0

    monkeypatch.setattr(prune, "run", fake_run)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    before = torch.get_num_threads()
    assert prune.main(["--checkpoint", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--set", "train.lr=1e-4", "--threads", "1"]) == 0
    assert seen == {"overrides": ["train.lr=1e-4", "train.threads=1"], "threads": 1}
    assert torch.get_num_threads() == before
    seen.clear()
    assert prune.main(["--checkpoint", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "o2")]) == 0
    assert seen == {"overrides": [], "threads": before}
