"""Orchestration of training: optimizer and schedules, train state and step, checkpoints, metrics."""
