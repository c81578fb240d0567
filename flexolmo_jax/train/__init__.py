"""Training: one loop for the public, expert and router-tuning stages (config decides)."""
