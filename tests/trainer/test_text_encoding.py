import pytest
import torch

from trainer.model_loading import load_sd_components
from trainer.text_encoding import encode_prompts, tokenize


@pytest.fixture(scope="module")
def te(tiny_sd_dir):
    m = load_sd_components(str(tiny_sd_dir))
    return m.tokenizer, m.text_encoder


def test_clip_skip_1_is_last_hidden_state(te):
    tok, enc = te
    ids = tokenize(tok, ["lswsks, a red circle"])
    with torch.no_grad():
        ref = enc(ids).last_hidden_state
        got = encode_prompts(tok, enc, ["lswsks, a red circle"], clip_skip=1)
    torch.testing.assert_close(got, ref)


def test_clip_skip_2_is_final_layer_norm_of_penultimate(te):
    tok, enc = te
    ids = tokenize(tok, ["lswsks, a red circle"])
    with torch.no_grad():
        hidden = enc(ids, output_hidden_states=True).hidden_states
        ref = enc.final_layer_norm(hidden[-2])
        got = encode_prompts(tok, enc, ["lswsks, a red circle"], clip_skip=2)
        off = encode_prompts(tok, enc, ["lswsks, a red circle"], clip_skip=1)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, off), "clip skip 2 must differ from clip skip 1"
    assert got.shape == (1, 77, enc.config.hidden_size)


def test_clip_skip_out_of_range(te):
    tok, enc = te
    with pytest.raises(ValueError, match="exceeds"):
        encode_prompts(tok, enc, ["x"], clip_skip=enc.config.num_hidden_layers + 2)
    with pytest.raises(ValueError, match=">= 1"):
        encode_prompts(tok, enc, ["x"], clip_skip=0)
