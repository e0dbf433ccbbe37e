"""zppo_fast: a lean RL post-training trainer for ZPPO."""
