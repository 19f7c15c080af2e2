"""Planning training runs as a whole (`megatron-sc2 plan`): which parallel layouts of a model fit
a cluster's GPUs and how fast each should run. It sits above training because its estimates use
training's FLOP count, and its memory oracle runs the engine and the optimizer."""
