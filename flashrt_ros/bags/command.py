"""`flashrt-ros bag info|recover`: the bag tools that need no ROS graph.

    flashrt-ros bag info BAG       # what `ros2 bag info BAG` prints (any layout open_bag reads)
    flashrt-ros bag recover DIR    # a killed recording -> a complete bag (flashrt_ros.bags.recover)
"""
from __future__ import annotations

import argparse
import sys

from flashrt_ros.bags.types import BagError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flashrt-ros bag", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    s = sub.add_parser("info", help="print what `ros2 bag info` prints")
    s.add_argument("bag", help="bag directory (or one .mcap file)")
    s = sub.add_parser("recover", help="turn an unfinished recording (a killed recorder) into a "
                                       "complete bag; the unfinished file is kept")
    s.add_argument("bag", help="bag directory")
    args = p.parse_args(argv)
    try:
        if args.verb == "info":
            from flashrt_ros.bags.reader import open_bag
            from flashrt_ros.bags.rosbag2 import format_info
            print(format_info(open_bag(args.bag).summary()), end="")
            return 0
        from flashrt_ros.bags.recover import recover
        done = recover(args.bag)
    except BagError as e:
        print(f"flashrt-ros bag {args.verb}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        what = e.filename or args.bag
        need = ("write access to the bag directory (recover writes a temporary directory, the "
                "new file and metadata.yaml into it)" if args.verb == "recover" else
                "read access to the bag directory and its files")
        print(f"flashrt-ros bag {args.verb}: cannot read/write {what}: {e.strerror or e}; "
              f"expected {need}; fix the permissions, or copy the bag somewhere writable",
              file=sys.stderr)
        return 2
    if not done:
        print(f"{args.bag}: complete already (metadata.yaml and finished files); nothing to do")
    for r in done:
        print(r.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
