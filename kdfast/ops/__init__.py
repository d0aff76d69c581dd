"""kdfast custom ops, one module per family: reference, fake kernel, autograd, backend choice."""
