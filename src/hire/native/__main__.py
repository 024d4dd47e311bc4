"""``python -m hire.native``: build the kernels now and say whether they are available.

Exit status 1 when they did not build and ``CI`` is set (as .ci/run runs), so a CI set-up step
fails on a broken build instead of testing only the eager path; 0 otherwise (a user without a
compiler keeps the eager path). Switching them off on purpose (HIRE_NATIVE=0) is not a failure.
"""

import sys

from hire import native
from hire.native.build import under_ci


def main() -> int:
    if native.available():
        print(f"native kernels: built ({native.build_dir()})")
        return 0
    print(f"native kernels: unavailable ({native.unavailable_reason()})")
    if under_ci() and not native.explicitly_disabled():
        print("CI is set: the native kernels must build here (a C++ compiler and ninja are needed; the build "
              "error is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
