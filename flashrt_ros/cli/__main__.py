"""`python -m flashrt_ros.cli ...` runs the `flashrt-ros` command."""
import sys

from flashrt_ros.cli.main import main

sys.exit(main())
