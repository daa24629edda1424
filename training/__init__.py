"""Retraining SoundNet on brain data: data readers, synthetic data, fine-tuning, evaluation."""
