"""A node whose global state is corrupted once: `python tests/faulty_node.py N <the
arguments of starling>` runs the starling CLI with one value of θ changed right after the
N-th outer step it applies — what a flipped bit in memory or a faulty outer step does.
The coordinator must see its fingerprint disagree and the node must resync."""

from __future__ import annotations

import sys
from typing import Any

from starling.cli import main
from starling.diloco import GlobalState

corrupt_at = int(sys.argv.pop(1))
outer_step = GlobalState.outer_step
applied = 0


def corrupted_outer_step(self: GlobalState, *args: Any, **kwargs: Any) -> Any:
    global applied
    result = outer_step(self, *args, **kwargs)
    applied += 1
    if applied == corrupt_at:
        self.params[0] += 1.0
    return result


GlobalState.outer_step = corrupted_outer_step  # type: ignore[method-assign]
sys.argv[0] = "starling"
main()
