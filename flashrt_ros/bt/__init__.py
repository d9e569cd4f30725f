"""py_trees behaviours over the node's capsule services, and the example trees built from them."""
