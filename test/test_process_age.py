"""The bring-up milestones ("first action N s after the interpreter started") count from the
interpreter's start, not from the process's: tools/run-demo.sh runs the bootstrap, then execs the
demo in the same process, whose /proc start is the shell's."""
import subprocess
import sys

SLEPT_S = 1.5


def test_the_age_counts_from_the_interpreter_not_from_what_the_process_ran_before_it():
    code = ("import time; from flashrt_ros.core import bringup; "
            "print(bringup.process_age_s(), time.time() - bringup.process_start_time())")
    out = subprocess.run(["bash", "-c", f"sleep {SLEPT_S}; exec {sys.executable} -c '{code}'"],
                         capture_output=True, text=True, check=True).stdout
    age, since_process_start = map(float, out.split())
    assert 0 < age < since_process_start - SLEPT_S + 0.05, (age, since_process_start)
