"""Suite-wide settings: XLA's backend (LLVM) optimisations off and its classic CPU fusion emitters, for this
process and every child (`training_helpers.FAST_COMPILE`). The suite is bound by compile time, not run time:
on this project's 2-core CPU, tests/test_conditioning.py took 164 s with the default optimisation level and
91 s without; the compute-heavier learning test 91 s vs 104 s; the classic emitters then halve the compile
of a train step again. The programs compute the same functions (XLA:CPU does not use fast-math either way);
only their speed differs."""

import os

from tests.training_helpers import FAST_COMPILE

if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
