"""Regional compilation (``VisionTransformer.compile_blocks``): blocks with different drop-path rates share one
compiled graph, so compiling a deep model costs about one block (a per-rate graph hit dynamo's recompile limit
on the H100 and left most blocks uncompiled)."""

import copy

import torch
from torch._dynamo.utils import counters

from unip.models import create_model


def test_blocks_with_different_drop_rates_share_one_graph():
    torch._dynamo.reset()
    counters.clear()
    model = create_model("unip_vit_tiny_patch16", depth=6, img_size=32, drop_path_rate=0.3).train()
    reference = create_model("unip_vit_tiny_patch16", depth=6, img_size=32, drop_path_rate=0.3).train()
    reference.load_state_dict(model.state_dict())
    model.compile_blocks(backend="eager")
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = model.attention_logits(images, 6)
    torch.manual_seed(1)
    expected = reference.attention_logits(images, 6)
    assert torch.allclose(out, expected, atol=1e-5)  # same drop-path masks, same result
    # block 1 has rate 0 (no drop path), blocks 2..5 share one graph whatever their rate; block 6 gives its
    # logits (``attention_logits``, compiled too: a third graph)
    assert counters["stats"]["unique_graphs"] == 3


def test_a_copy_of_a_compiled_model_computes_with_its_own_weights():
    model = create_model("unip_vit_tiny_patch16", depth=2, img_size=32).eval()
    model.compile_blocks(backend="eager")
    images = torch.randn(1, 3, 32, 32)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.blocks[1].parameters():
            param.zero_()
        original, copied = model.attention_logits(images, 2), twin.attention_logits(images, 2)
    assert copied.abs().max() == 0 and original.abs().max() > 0  # the copy's last block: zero q, k
