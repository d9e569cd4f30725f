"""Execution-state capsules, with no ROS imports: the capsule value, its file format, the memory pools
of the GPU and host tiers, and the stores (`CapsuleStore`, and `PagedCapsuleStore` over shared blocks)."""
