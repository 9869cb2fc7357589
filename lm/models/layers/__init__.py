"""Building blocks shared by every model family: projections, norms, rotary, attention, MLPs."""
