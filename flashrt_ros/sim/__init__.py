"""A simulated robot for the demo and the tests: publishes observations, follows the node's actions."""
