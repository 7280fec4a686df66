"""fedmeta and the two baselines every peer is compared against, one module per system."""
