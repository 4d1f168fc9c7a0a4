"""Fast FeedForward trees: dense feed-forward blocks become router trees with one leaf per token."""
