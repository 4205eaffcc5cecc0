"""Loading, saving, external data and spill, shapes, the graph helpers and the weighted-layer index."""
