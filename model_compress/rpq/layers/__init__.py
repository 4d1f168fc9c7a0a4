"""The RPQ layers (Linear, Embedding, tied head) and which layers must stay dense because the model reads their weight."""
