"""The optional torch.compile path: compiled blocks trace the reference ops and give the eager results."""
import shutil

import pytest
import torch

from llama_core.config import get_config
from llama_core.model import Transformer


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    eager = Transformer(get_config("tiny"))
    compiled = Transformer(get_config("tiny"))
    compiled.load_state_dict(eager.state_dict())
    for layer in compiled.model.layers:
        layer.compile()
    assert list(dict(compiled.named_parameters())) == list(dict(eager.named_parameters()))  # names unchanged
    ids = torch.randint(0, eager.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
