"""The model: norm, rope, fast, attention, moe, transformer (read them in that order); quant swaps in
int8/int4 modules."""
