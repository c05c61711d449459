"""`tbo-parity upstream`: does an SGLang release still split batches the way the spec says?

    python -m tbo_parity.parity_tests.upstream --sglang_version=0.5.23 [--sglang_version=0.4.7 ...]
    python -m tbo_parity.parity_tests.upstream --sglang_version=0.4.7,0.4.9,0.5.23
    python -m tbo_parity.parity_tests.upstream --sglang_source=PATH
        (PATH: a .py file, a source tree, a wheel or sdist, an installed package dir)

For each release it

1. fetches the wheel without dependencies (``pip download sglang==V --no-deps``) into
   ``--cache_dir`` (a wheel already there is reused), or reads ``--sglang_source``;
2. finds the module holding the split functions wherever the release keeps it (the file that
   defines ``compute_split_seq_index``) and the release's ``ForwardMode`` (the file that
   defines ``class ForwardMode``);
3. loads the pure functions of the split rules **without importing SGLang**: it parses the
   module with ``ast``, lifts out the functions and methods it knows (``ROLES``), strips their
   type annotations, and executes them in a namespace of small stand-ins (the threshold getter,
   the server arguments, a device, real ``torch`` where a function builds a tensor);
4. runs the batches of ``tbo-parity run`` (``parity_tests/cases.py``: every mode, skewed
   shapes), degenerate EXTEND batches, every replay size up to 256, and every data-parallel
   report of up to 3 ranks through the release's functions and through ``reference.split``,
   arguments bound by parameter name since signatures differ between releases;
5. picks the EXTEND split rule the release follows (``reference.split.EXTEND_SPLITS``,
   docs/spec.md, "EXTEND split rules") and the data-parallel rule
   (``reference.split.DP_RULES``, docs/spec.md, "Data-parallel agreement"; a release matching
   neither compared under the default) and prints, per function, the cases, agreements,
   expected differences and disagreements, with the first disagreements as pasteable
   ``SplitCase(...)`` literals.

Expected differences are counted apart, not as failures: the spec's documented choices
(docs/spec.md, "Where this spec deliberately differs from upstream SGLang": IDLE graph replay,
a ValueError where upstream asserts), a mode the spec does not cover (MIXED), and a mode the
release does not have yet (TARGET_VERIFY before speculative verify came). A function missing
from a release is reported as absent, one found under an older name as renamed, and a function
of the module that the loader does not know as unknown.

Exit status: 0 every release agrees (up to expected differences) under one of the rules; 1 an
unexplained disagreement, or a release that matches no rule; 2 bad usage, or a release that
could not be fetched or holds no split module.

The package, one module per part: ``fetch`` (finding the module: a fetched wheel or a source on
disk), ``stand_ins`` (what the lifted functions run among), ``lift`` (the roles the loader
knows, and loading them out of the module's AST), ``outcomes`` (calling either side, comparable
results), ``batches`` (the probes), ``classify`` (the comparison and its classification),
``report`` (the printed report) and ``cli`` (the command and its flags; ``__main__`` runs it).
"""

from tbo_parity.parity_tests.upstream.cli import FLAGS, main

__all__ = ["FLAGS", "main"]
