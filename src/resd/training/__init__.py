"""One training step and everything it is made of: the trainer, the lesson half (reflect,
tag, curate, the teacher's context), the update half (losses, the teacher, the optimizer
step), the playbook, checkpoints and tracking."""
