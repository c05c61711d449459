"""`python -m tbo_parity.parity_tests.upstream`: the command of parity_tests/upstream (its
docstring)."""

import sys

from tbo_parity.parity_tests.upstream import main

sys.exit(main())
