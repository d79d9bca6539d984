"""Depth pruning (edgediag.compress.depth): removing residual blocks is exact where the
block's branch is zero, a removed block rebuilds from the config, the importance is the
block's relative change of its input, streaming still matches the full sequence, and
the prune verb's --remove-blocks gives a loadable checkpoint whose ONNX export passes parity."""

from __future__ import annotations

import json

import pytest
import torch

from edgediag import cli, export
from edgediag import prune as prune_verb
from edgediag.compress.depth import block_importance, prune_depth
from edgediag.config import to_dict
from edgediag.engine.checkpoint import load_model, make_checkpoint, save_checkpoint
from edgediag.models import create_model
from edgediag.nn.depth import RemovedBlock
from tests.toy import trained_image_checkpoint

ATOL = 1e-5  # float32, outputs of order 1

SMALL = {
    "tastgram_mfn_small": dict(n_classes=3, clip_seconds=1.0),
    "memorymamba": dict(n_classes=3, in_chans=1, image_size=32, patch_size=4, depths=[1, 2], dims=[16, 32],
                        d_state=1, coarse_slots=2, fine_slots=2, mlp_ratio=2.0, stem="convbn"),
    "ldmamba": dict(n_classes=3, n_features=8, seq_len=24, d_model=16, stem_channels=[16], d_inner=[16, 16, 16],
                    se_hidden=[8, 8, 8], head_hidden=8, d_state=4),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(model, x):
    with torch.no_grad():
        out = model.export_module()(x)
    return out if isinstance(out, tuple) else (out,)


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = create_model(name, **SMALL[name]).eval()
    with torch.no_grad():  # trained-looking residual branches (zero-initialised gains would make them 0)
        for block_name in model.removable_blocks():
            for p in model.get_submodule(block_name).parameters():
                if p.dim() == 1 and torch.all(p == 0):
                    p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("name", list(SMALL))
def test_the_least_important_block_goes_and_the_model_rebuilds_from_config(name):
    model = _model(name)
    x = model.example_input(4)
    before = _outputs(model, x)
    scores = block_importance(model, x)
    assert set(scores) == set(model.removable_blocks()) and len(scores) >= 2
    assert all(v > 0 for v in scores.values())
    record = prune_depth(model, 1, x)
    removed = record["removed_blocks"]
    assert removed == [min(scores, key=scores.get)] and model.config.removed_blocks == removed
    assert isinstance(model.get_submodule(removed[0]), RemovedBlock)
    assert removed[0] not in model.removable_blocks()
    after = _outputs(model, x)
    assert any(not torch.allclose(a, b) for a, b in zip(after, before))
    # a checkpoint's config rebuilds the shallower model; the other blocks keep their keys
    rebuilt = create_model(name, to_dict(model.config)).eval()
    assert all(not k.startswith(removed[0] + ".") for k in rebuilt.state_dict())
    rebuilt.load_state_dict(model.state_dict())  # strict
    for a, b in zip(_outputs(rebuilt, x), after):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_importance_is_the_relative_change_a_block_makes():
    model = _model("memorymamba")
    x = model.example_input(3)
    name = model.removable_blocks()[1]
    seen = {}
    model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(h=a[0], y=o[0]))
    scores = block_importance(model, x)
    h, y = seen["h"].flatten(1), seen["y"].flatten(1)
    expected = ((y - h).pow(2).sum(1) / h.pow(2).sum(1)).mean().item()
    assert scores[name] == pytest.approx(expected, rel=1e-5) and expected > 0


def test_a_block_whose_branch_is_zero_goes_first_and_exactly():
    """MobileFaceNet bottleneck with its last BatchNorm zeroed is the identity: depth
    pruning must find it (importance 0) and the outputs must not change."""
    model = _model("tastgram_mfn_small")
    target = model.removable_blocks()[-1]
    with torch.no_grad():
        last_bn = model.get_submodule(target).conv[-1]
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    x = model.example_input(2)
    before = _outputs(model, x)
    assert block_importance(model, x)[target] == 0.0
    assert prune_depth(model, 1, x)["removed_blocks"] == [target]
    for a, b in zip(_outputs(model, x), before):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_channel_pruning_after_depth_pruning_rebuilds():
    """Both kinds in one config: removed blocks and pruned widths of the remaining layers."""
    from edgediag.compress import structured as sp
    from edgediag.compress.budget import Budget, model_params
    from edgediag.nn.pruning import record_widths

    model = _model("memorymamba")
    x = model.example_input(2)
    prune_depth(model, 1, x)
    model, _ = sp.prune_structured(model, budget=Budget("params", 0.7 * model_params(model)), steps=6)
    reference = create_model("memorymamba", {**to_dict(model.config), "pruned_widths": {}})
    config = {**to_dict(model.config), "pruned_widths": record_widths(model, reference)}
    rebuilt = create_model("memorymamba", config).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x), atol=ATOL, rtol=1e-5)
    # the model still trains: the memory losses skip the removed block
    rebuilt.train()
    out = rebuilt.training_step({"x": x, "y": torch.tensor([0, 1])})
    out["loss"].backward()


def test_causal_ldmamba_streams_after_a_block_is_removed():
    kw = {**SMALL["ldmamba"], "causal": True, "bidirectional": False}
    torch.manual_seed(0)
    model = create_model("ldmamba", **kw).eval()
    xs = torch.randn(2, 24, 8)
    prune_depth(model, 1, xs)
    sm = model.streaming_module()
    assert not any(n.startswith(f"block{model.config.removed_blocks[0].split('.')[1]}_") for n in sm.state_names)
    with torch.no_grad():
        full = sm.full_sequence(xs)
        states = list(sm.example_inputs(2)[1:])
        steps = []
        for t in range(xs.shape[1]):
            out = sm(xs[:, t], *states)
            steps.append(out[0])
            states = list(out[3:])
    torch.testing.assert_close(torch.stack(steps, 1), full[0], rtol=1e-5, atol=1e-5)


def test_too_many_or_unknown_blocks_are_one_line_errors():
    model = _model("ldmamba")
    with pytest.raises(cli.UserError, match="has 3 removable residual blocks"):
        prune_depth(model, 4, model.example_input(2))
    with pytest.raises(cli.UserError, match="is not a removable residual block"):
        create_model("ldmamba", **{**SMALL["ldmamba"], "removed_blocks": ["stem_convs.0"]})


# --- the verb -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memorymamba_run(tmp_path_factory):
    """A memorymamba checkpoint (two short epochs) on generated defect images."""
    return trained_image_checkpoint(tmp_path_factory.mktemp("depth"), "memorymamba", **SMALL["memorymamba"])


def test_prune_verb_removes_blocks_then_channels_and_the_result_exports(memorymamba_run, tmp_path):
    ckpt, data = memorymamba_run
    out = tmp_path / "pruned"
    args = ["--checkpoint", ckpt, "--data", data, "--out", out, "--remove-blocks", "1", "--ratio", "0.5",
            "--finetune-epochs", "1", "--latency-runs", "3"]
    assert cli.run(prune_verb.main, [str(a) for a in args]) == 0
    report = json.loads((out / "prune.json").read_text())
    depth = report["records"]["depth"]
    assert report["remove_blocks"] == 1 and len(depth["removed_blocks"]) == 1
    assert report["reduction"]["params"] >= 0.5
    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert payload["model_config"]["removed_blocks"] == depth["removed_blocks"]
    model, _ = load_model(out / "model.pt")
    assert isinstance(model.get_submodule(depth["removed_blocks"][0]), RemovedBlock)
    exp = tmp_path / "export"
    assert cli.run(export.main, ["--checkpoint", str(out / "model.pt"), "--out", str(exp), "--latency-runs", "2",
                                 "--parity-items", "4", "--threads", "1"]) == 0
    assert json.loads((exp / "export.json").read_text())["parity"]["passed"]


def test_remove_blocks_on_a_model_without_residual_blocks_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("image_cnn", n_classes=3, in_chans=1, image_size=32, widths=[8, 16], depths=[1, 1])
    from edgediag.data.synth_images import generate_defect_images

    data = tmp_path / "images"
    generate_defect_images(data, n_per_class=4, size=32, classes=("normal", "scratch", "pit"))
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(model, data={"kind": "image", "classes": ["normal", "scratch", "pit"],
                                                                    "normal_classes": ["normal"]}))
    out = tmp_path / "o"
    rc = cli.run(prune_verb.main, [str(a) for a in ["--checkpoint", tmp_path / "m.pt", "--data", data, "--out", out,
                                                    "--remove-blocks", "1", "--no-latency"]])
    assert rc == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 0 removable residual blocks" in err[0]
    assert not out.exists() or not any(out.iterdir())

