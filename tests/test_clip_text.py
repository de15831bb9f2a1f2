"""Our Flax CLIP text encoder, converted from a random small transformers
`CLIPTextModel` saved to safetensors, equals it: last hidden state, pooled output (both
pooling rules), every layer's hidden state and the clip-skip embeddings diffusers builds.
"""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion.convert.clip_text import convert_clip_text, load_clip_text
from diffusion.models.clip_text import CLIPTextConfig, CLIPTextModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 1000, 77
# (hidden_act, eos_token_id, pad id): the legacy eos id 2 pools at argmax(ids) (eos is
# the largest id, 999, and pads too, as in SD 1.x); otherwise at the first eos (500,
# not the largest id, so the two rules pick different positions), padded with 0.
VARIANTS = {"quick_gelu_legacy_eos": ("quick_gelu", 2, 999, 999),
            "gelu_eos_id": ("gelu", 500, 500, 0)}


def _ids(rng, eos, pad, bos=998, lengths=(5, 20, 75, 0)):
    ids = np.full((len(lengths), SEQ), pad, np.int64)
    for b, n in enumerate(lengths):
        body = rng.integers(1, 998, n)
        body[body == eos] = 7
        ids[b, :n + 2] = [bos, *body, eos]
    return ids


def _save_reference(folder, hidden_act, eos_token_id, seed=0):
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=SEQ, hidden_act=hidden_act,
        bos_token_id=998, eos_token_id=eos_token_id, pad_token_id=1)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # far from the init's near-identity, so every weight matters
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.2))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _run_torch(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=None if mask is None
                    else torch.as_tensor(mask), output_hidden_states=True)
        skip = model.final_layer_norm(out.hidden_states[-2])
    return out, skip.numpy()


@pytest.fixture(scope="module")
def apply_fn():
    return jax.jit(CLIPTextModel.apply, static_argnums=0,
                   static_argnames=("clip_skip", "output_hidden_states"))


def _close(ours, ref, what):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5,
                               err_msg=what)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_equals_transformers(tmp_path, apply_fn, variant):
    hidden_act, eos_token_id, eos, pad = VARIANTS[variant]
    model = _save_reference(tmp_path / "text_encoder", hidden_act, eos_token_id)
    if variant == "quick_gelu_legacy_eos":
        # transformers 4's layout, as SD checkpoints hold it: a `text_model.` prefix and
        # the position_ids buffer; read from the pipeline folder above text_encoder/.
        file = tmp_path / "text_encoder" / "model.safetensors"
        sd = {f"text_model.{k}": v for k, v in load_file(file).items()}
        sd["text_model.embeddings.position_ids"] = np.arange(SEQ)[None]
        save_file(sd, file)
        module, params = load_clip_text(tmp_path)
    else:
        module, params = load_clip_text(tmp_path / "text_encoder")
    assert module.config == CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=SEQ, hidden_act=hidden_act,
        eos_token_id=eos_token_id)
    ids = _ids(np.random.default_rng(1), eos, pad)
    ref, ref_skip = _run_torch(model, ids)
    out = apply_fn(module, {"params": params}, ids.astype(np.int32), clip_skip=1,
                   output_hidden_states=True)
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    _close(out.pooler_output, ref.pooler_output, "pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")
    _close(out.prompt_embeds, ref_skip, "clip_skip=1 prompt_embeds")
    # The pooling rule matters for these ids: the other rule picks other states.
    first_eos, argmax = (ids == eos).argmax(1), ids.argmax(1)
    assert (first_eos != argmax).any() == (eos_token_id != 2)
    plain = apply_fn(module, {"params": params}, ids.astype(np.int32))
    assert plain.hidden_states is None
    np.testing.assert_array_equal(plain.prompt_embeds, plain.last_hidden_state)


def test_padding_mask_equals_transformers(tmp_path, apply_fn):
    model = _save_reference(tmp_path / "te", "quick_gelu", 500, seed=3)
    module, params = load_clip_text(tmp_path / "te")
    ids = _ids(np.random.default_rng(2), 500, 0)
    mask = (np.arange(SEQ)[None] <= (ids == 500).argmax(1)[:, None]).astype(np.int64)
    ref, _ = _run_torch(model, ids, mask)
    out = apply_fn(module, {"params": params}, ids.astype(np.int32), mask.astype(np.int32))
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state, masked")
    _close(out.pooler_output, ref.pooler_output, "pooler_output, masked")


def test_bad_checkpoints_are_named(tmp_path):
    _save_reference(tmp_path / "te", "quick_gelu", 500)
    sd = load_file(tmp_path / "te" / "model.safetensors")
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4)
    convert_clip_text(sd, config)  # the untouched state dict converts
    bad = dict(sd)
    del bad["encoder.layers.1.mlp.fc2.bias"]
    bad["encoder.layers.1.mlp.fc3.weight"] = sd["encoder.layers.1.mlp.fc2.weight"]
    bad["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(ValueError) as e:
        convert_clip_text(bad, config)
    msg = str(e.value)
    assert "1 missing params ['encoder/layers_1/mlp/fc2/bias']" in msg
    assert "1 unexpected keys ['encoder.layers.1.mlp.fc3.weight']" in msg
    assert "encoder.layers.0.self_attn.q_proj.weight: (32, 16) in the file, the config " \
           "needs (32, 32)" in msg
    # A config.json that disagrees with the weights: the folder and the keys are named.
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    (tmp_path / "te" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"te: .*mlp.fc1.weight: \(64, 32\) in the file"):
        load_clip_text(tmp_path / "te")
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_text(tmp_path)
