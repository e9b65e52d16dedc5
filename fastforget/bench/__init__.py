"""Benchmarks behind `fastforget bench`: each op against its eager reference and torch.compile."""
