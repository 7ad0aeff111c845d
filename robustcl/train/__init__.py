"""Phase-1 pre-training and phase-2 fine-tuning."""
