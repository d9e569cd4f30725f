"""Execution-state capsules, with no ROS imports: the capsule value, its file format, the store
(`CapsuleStore`: index, disk tier, eviction, lineage) and its memory tiers (`ExtentMemory` over byte
pools, or `BlockMemory` over shared blocks: `PagedCapsuleStore`)."""
