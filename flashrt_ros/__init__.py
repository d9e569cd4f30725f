"""flashrt_ros: execution-state capsules for robot policies, served as a ROS 2 node.

The runtime core (config, arena, model, plans, runtime, capsule, store) imports no ROS; the node,
CLI, behaviours and bag tools are thin adapters on top.

The generated interfaces (`flashrt_ros.msg`, `flashrt_ros.srv`) may live in a different directory
than these sources (pip editable installs put them in site-packages, colcon merges them into one
directory): extending `__path__` lets both layouts import them as submodules of this package.
"""
import time
from pkgutil import extend_path

# When this package was first imported: for flashrt_node and flashrt-ros, which import it first,
# when the interpreter began its own work (core/bringup.py: process_age_s).
IMPORTED_AT = time.time()

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
