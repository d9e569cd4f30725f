"""The ROS 2 adapter: the lifecycle node, its parameters, executors, and the helpers its clients share."""
