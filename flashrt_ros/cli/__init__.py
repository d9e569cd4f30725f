"""The `flashrt-ros` command line: capsule tools, the demo, the behaviour-tree demo, bags, benchmarks."""
