"""Code evaluation: HumanEval and its infilling sets, a sandbox, pass@k, and generation from
our own model with a sliding-window key/value cache (`megatron-sc2 eval`)."""
