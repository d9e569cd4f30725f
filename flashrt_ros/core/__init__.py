"""The runtime core, with no ROS imports: configuration, the state arena, the policy network and its
kernels, the step plans (CUDA graphs or eager), the rollback ring and `PolicyRuntime` on top."""
