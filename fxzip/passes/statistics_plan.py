"""Which spaces each statistics pass collects, and which rank owns each space, so that the
accumulators and the matching of a pass fit the memory budget.

A pass holds the accumulators of its spaces (`accumulator_bytes`) while the models run, then
matches them one by one (`matching_bytes` beside the co-moments). Spaces that are matched
together (a head group's) are one unit, never split. Under torch.distributed every unit has one
owner rank that holds its accumulators and matches it: a rank's share of a pass is what it
owns, so the memory per rank falls with the number of ranks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..runtime.memory import accumulator_bytes, matching_bytes

__all__ = ["StatisticsPass", "plan_passes", "unit_bytes"]


@dataclass
class StatisticsPass:
    """One read of the calibration data: the spaces it collects and each one's owner rank."""

    spaces: list[int] = field(default_factory=list)
    owners: dict[int, int] = field(default_factory=dict)

    def owned_by(self, rank: int) -> list[int]:
        """The spaces of the pass that `rank` holds and matches."""
        return [s for s in self.spaces if self.owners[s] == rank]


def unit_bytes(unit: Sequence[int], dims: Mapping[int, int]) -> tuple[int, int]:
    """(accumulator bytes, matching bytes) of a unit of spaces (`dims`: features of all models)."""
    return (sum(accumulator_bytes(dims[s]) for s in unit),
            max(matching_bytes(dims[s]) for s in unit))


def plan_passes(units: Sequence[Sequence[int]], dims: Mapping[int, int],
                budget_bytes: float | None, ranks: int = 1) -> list[StatisticsPass]:
    """Passes over the units (in order), each rank's share of a pass within `budget_bytes`: its
    units' accumulators plus the largest one's matching. A unit goes to the rank with the least
    held so far in the pass (then over all passes) where it fits, a rank with nothing in the pass
    taking any unit (a unit larger than the whole budget has a rank's share of a pass to
    itself); a unit that fits no rank starts a new pass. None: one pass, units spread over the
    ranks by size."""
    passes: list[StatisticsPass] = []
    loads: list[list[int]] = []  # per rank: [accumulator bytes, largest matching bytes]
    totals = [0] * ranks  # per rank, over all passes
    for unit in units:
        held, matching = unit_bytes(unit, dims)

        def fits(r: int) -> bool:
            total = loads[r][0] + held + max(loads[r][1], matching)
            return budget_bytes is None or loads[r][0] == 0 or total <= budget_bytes

        candidates = sorted(range(ranks), key=lambda r: (loads[r][0], totals[r])) if passes \
            else []
        chosen = next((r for r in candidates if fits(r)), None)
        if chosen is None:
            passes.append(StatisticsPass())
            loads = [[0, 0] for _ in range(ranks)]
            chosen = min(range(ranks), key=lambda r: (totals[r], r))
        totals[chosen] += held
        loads[chosen][0] += held
        loads[chosen][1] = max(loads[chosen][1], matching)
        passes[-1].spaces.extend(unit)
        passes[-1].owners.update({s: chosen for s in unit})
    return passes
