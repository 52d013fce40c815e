"""Benchmarks of spine-node against peers run in the same script (see DESIGN.md, Conventions)."""
