"""The instance machine as Mermaid or Graphviz text, byte-identical on every run.

Labels are the event names the log records (`connect_failed`), guards in brackets; no
callback names. The lifecycle comes first, then the events that lead from every state
(`rediscover`, `remove`), grouped by event: the order the README shows.
"""

from __future__ import annotations

from fsm_hub.core.machine import InstanceMachine

Edge = tuple[str, str, str, str]
"""(source, target, event, guard)."""


def edges() -> list[Edge]:
    states = [state.id for state in InstanceMachine.states]
    found: list[Edge] = []
    for state in InstanceMachine.states:
        for transition in state.transitions:
            guard = " and ".join(str(c) for c in transition.cond)
            for event in transition.events:
                found.append((state.id, transition.target.id, str(event), guard))
    sources: dict[str, set[str]] = {}
    for source, _, event, _ in found:
        sources.setdefault(event, set()).add(source)
    everywhere = [e for e in sources if sources[e] == set(states)]
    lifecycle = [edge for edge in found if edge[2] not in everywhere]
    return lifecycle + [edge for event in everywhere for edge in found if edge[2] == event]


def _label(event: str, guard: str) -> str:
    return f"{event} [{guard}]" if guard else event


def mermaid() -> str:
    initial = InstanceMachine.initial_state.id
    lines = ["stateDiagram-v2", "    direction LR", f"    [*] --> {initial}"]
    lines += [f"    {s} --> {t} : {_label(e, g)}" for s, t, e, g in edges()]
    return "\n".join(lines)


def dot() -> str:
    initial = InstanceMachine.initial_state.id
    lines = [
        "digraph InstanceMachine {",
        "    rankdir=LR;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
        '    __start [shape=point, label=""];',
    ]
    lines += [f"    {state.id};" for state in InstanceMachine.states]
    lines.append(f"    __start -> {initial};")
    lines += [f'    {s} -> {t} [label="{_label(e, g)}"];' for s, t, e, g in edges()]
    lines.append("}")
    return "\n".join(lines)


def render(fmt: str) -> str:
    return mermaid() if fmt == "mermaid" else dot()
