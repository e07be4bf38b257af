"""Issue 17, kind 8: an adapter whose tensor names do not match the draft is an error naming the keys, never a
silent no-op."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_draft, tiny_target
from draftguide.errors import DraftGuideError
from draftguide.training.ttt import load_adapter, ttt_adapt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    t = tiny_target()
    d = tiny_draft(t)
    path = tmp_path_factory.mktemp("adapter") / "a"
    ttt_adapt(d, t, torch.arange(4, 60)[None], steps=2, lr=1e-2, anchors_per_step=2, eval_anchors=2).save_adapter(path)
    return t, d, path


def _rewrite(src, dst, rename=lambda k: k, drop=lambda k: False):
    import shutil

    shutil.copytree(src, dst)
    w = load_file(str(src / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in w.items() if not drop(k)}, str(dst / "adapter_model.safetensors"))
    return dst


def test_matching_adapter_loads_and_changes_the_draft(saved):
    t, d, path = saved
    a = load_adapter(d, path)
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in a._peft.named_parameters())


def test_renamed_keys_are_named(saved, tmp_path):
    t, d, path = saved
    bad = _rewrite(
        path, tmp_path / "renamed", rename=lambda k: k.replace("base_model.model.", "base_model.model.draft.")
    )
    with pytest.raises(DraftGuideError) as e:
        load_adapter(d, bad)
    msg = str(e.value)
    assert "match no LoRA weight" in msg and "base_model.model.draft.fc.lora_A.weight" in msg
    assert "get no tensor" in msg and "lora_A.default.weight" in msg


def test_missing_keys_are_named(saved, tmp_path):
    t, d, path = saved
    bad = _rewrite(path, tmp_path / "partial", drop=lambda k: "k_proj" in k)
    with pytest.raises(DraftGuideError, match=r"get no tensor: .*k_proj"):
        load_adapter(d, bad)


def test_wrong_shape_is_an_error(saved, tmp_path):
    t, d, path = saved
    bad = _rewrite(path, tmp_path / "shape")
    w = load_file(str(bad / "adapter_model.safetensors"))
    k = next(k for k in w if "lora_A" in k)
    w[k] = torch.zeros(w[k].shape[0] + 1, w[k].shape[1])
    save_file(w, str(bad / "adapter_model.safetensors"))
    with pytest.raises(DraftGuideError, match="does not fit this draft"):
        load_adapter(d, bad)
    assert json.loads((bad / "adapter_config.json").read_text())
