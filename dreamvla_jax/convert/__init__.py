"""PyTorch / HF checkpoints -> our parameter trees: one mapping table per source (clip, mae, gpt2)."""
