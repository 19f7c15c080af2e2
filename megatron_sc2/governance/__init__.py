"""Knowing what is in the training data: the membership test (Data Portraits), corpus search
over the tokens (suffix arrays), opt-out removal, and the server the VS Code extension talks to.

Everything here reads datasets; the provenance sidecar format they use lives low, in
`megatron_sc2.data.provenance`, so nothing in `data/` imports this package.
"""
