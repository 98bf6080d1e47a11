"""CUDA paths: bf16/fp16 training steps and the compiled fast path. Skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F

from t2t_dist.models import create_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_step_is_finite(name, dtype):
    torch.manual_seed(0)
    model = create_model(name).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(8, 3, 224, 224, device="cuda") * 3  # large inputs stress the performer
    labels = torch.randint(0, 1000, (8,), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad()


def test_sdpa_matches_eager_reference_on_cuda():
    torch.manual_seed(0)
    eager = create_model("t2t_vit_14", attention="eager").cuda().eval()
    fast = create_model("t2t_vit_14", attention="sdpa").cuda().eval()
    fast.load_state_dict(eager.state_dict())
    images = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(images), eager(images), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_bf16_forward_matches_eager():
    """Logits compared, not a loss: an untrained head gives near-zero logits, whose loss is
    ln(1000) whatever the body computes (an all-zero output would pass a loss check)."""
    torch.manual_seed(0)
    model = create_model("t2t_vit_7").cuda().eval()  # no dropout: both paths compute one function
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)  # logits with a spread of a few units
    compiled = torch.compile(model)
    images = torch.randn(16, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(images).float()
        got = compiled(images).float()
    spread = expected.std().item()
    assert spread > 1.0 and torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits; fused kernels round differently: a few % of the spread.
    torch.testing.assert_close(got, expected, rtol=0.0, atol=0.05 * spread)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9
