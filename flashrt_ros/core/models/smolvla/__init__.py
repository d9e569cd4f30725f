"""LeRobot's SmolVLA: configuration, modules, checkpoint loading, processors and its policy on the
state arena."""
