"""Training: the step functions, optimizers, losses, checkpoints and the samples logged
while a run trains."""
