"""The optimizer: Muon (batched Newton-Schulz) and the optax chain around it."""
