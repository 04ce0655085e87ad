import torch

import runlora


def test_import_and_op_runs():
    x = torch.randn(4, 8)
    w = torch.randn(6, 8)
    a = torch.randn(2, 8, requires_grad=True)
    b = torch.zeros(6, 2, requires_grad=True)
    y = runlora.lora_linear(x, w, a, b)
    torch.testing.assert_close(y, x @ w.t())
