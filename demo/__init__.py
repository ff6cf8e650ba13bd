"""edgeserve.demo: the whole system on embedded defaults, and the simulator behind it.

The one part that ties the others together: :mod:`edgeserve.demo.app` is ``edgeserve demo``,
:mod:`edgeserve.demo.sim` runs fleets of real agents (in this process or in worker processes) next
to a fleet service in a child process, and :mod:`edgeserve.demo.models` trains the small digits
models they serve. The rollout benchmark and the end-to-end tests use the same pieces.

It imports the core and every part (converter, agent, fleet); nothing imports it but the CLI's
lazy ``demo`` group, the benchmarks and the tests. It needs ``edgeserve[all]``.
"""

from __future__ import annotations

__all__: list[str] = []
