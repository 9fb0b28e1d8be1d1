"""The model: layers, attention, the MoE block and its dispatch, the transformer, FLOP counts, decoding."""
