"""The model: norm, rope, attention, moe, transformer (read them in that order)."""
