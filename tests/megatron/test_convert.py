"""HF → megatron-core conversion: the converted GPTModel gives the HF model's logits (fp32, CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from twinkle.model.transformers._random import build_random_model

    return build_random_model(tmp_path_factory.mktemp("mg") / "m", vocab_size=300, tie_embeddings=False)


def test_logits_match_hf(hf_dir):
    from transformers import AutoModelForCausalLM

    from twinkle.model.megatron._model import causal_forward, init_parallel, load_megatron_model

    init_parallel()
    mg, _, g = load_megatron_model(hf_dir, dtype=torch.float32, device=torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, g.vocab, (3, 12), generator=gen)
    att = torch.ones_like(ids)
    att[1, 9:] = 0  # right padding on one row
    with torch.no_grad():
        ref = hf(ids, attention_mask=att).logits
        got = causal_forward(mg, ids, att)
    assert got.shape == ref.shape
    real = att.bool()
    assert torch.allclose(got[real], ref[real], atol=1e-4), (got[real] - ref[real]).abs().max()


def test_qkv_slices_partition_rows():
    from twinkle.model.megatron.convert import Geometry, qkv_slices

    g = Geometry(hidden=64, ffn=128, layers=1, heads=8, groups=2, head_dim=8, vocab=10, tied=True,
                 qkv_bias=True, qk_norm=False)
    sl = qkv_slices(g)
    allrows = torch.cat([sl["q_proj"], sl["k_proj"], sl["v_proj"]]).sort().values
    assert torch.equal(allrows, torch.arange((8 + 2 * 2) * 8))
    assert sl["q_proj"].numel() == 64 and sl["k_proj"].numel() == 16
    # group 0 holds 4 q heads then k then v
    assert sl["k_proj"][0].item() == 32 and sl["v_proj"][0].item() == 40 and sl["q_proj"][32].item() == 48
