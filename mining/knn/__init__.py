"""k-nearest-neighbour search: FAISS indexes, an exact torch path, top-k merging."""
