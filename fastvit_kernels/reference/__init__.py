"""Plain-PyTorch references: the specification of each op, the test oracle and the fallback."""
