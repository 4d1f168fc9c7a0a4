"""What every method shares: model sources, texts, the checkpoint folder, errors, the method registry."""
