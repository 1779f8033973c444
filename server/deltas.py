"""One answer's text deltas split as chat splits them: the reasoning block (`--reasoning-parser`),
then content and tool calls (`server.tools`). The Responses and Messages APIs build their own
output from these parts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server import reasoning, tools


@dataclass
class DeltaSplitter:
    tool_plan: tools.ToolPlan
    thinking: reasoning.Thinking | None
    thoughts: reasoning.ReasoningStream | None = None
    tool_stream: tools.ToolStream | None = None

    def feed(self, new_text: str, finish_reason: str | None) -> tuple[str, str, list[dict[str, Any]]]:
        """(reasoning, content, chat tool-call deltas) of one text delta; `finish_reason` set on the last."""
        thought = ""
        if self.thinking is not None:
            self.thoughts = self.thoughts or self.thinking.stream()
            thought, new_text = self.thinking.feed(self.thoughts, new_text, finish_reason is not None)
        if not self.tool_plan.calls_tools:
            return thought, new_text, []
        self.tool_stream = self.tool_stream or tools.ToolStream(self.tool_plan)
        delta, _ = self.tool_stream.feed(new_text, finish_reason)
        delta = delta or {}
        return thought, delta.get("content", ""), delta.get("tool_calls", [])

    @property
    def reasoned(self) -> bool:
        """Whether the answer had a reasoning block (maybe empty)."""
        return self.thoughts is not None and self.thoughts.entered
